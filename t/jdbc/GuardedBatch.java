// A JDBC client for t/008_jdbc.pl: several connections, one per thread,
// each writing batches of rows guarded by one etcd transaction lock.
//
// Each batch is one transaction:
//     conn.setAutoCommit(false);
//     SELECT etcd_xact_lock(?, ?)        -- prepared statement: name, ttl
//     SELECT etcd_lock_token(?)          -- the fencing token of the handle
//     INSERT ... (addBatch x N, executeBatch), each row tagged with the token
//     conn.commit();                     -- the lock goes after the commit
//
// Usage: java GuardedBatch JDBC_URL THREADS BATCHES ROWS_PER_BATCH LOCK_NAME TTL
// Prints "OK <rows>" and exits 0, or prints the failure and exits 1.
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;

public class GuardedBatch {
    public static void main(String[] args) throws Exception {
        if (args.length != 6) {
            System.err.println("usage: GuardedBatch JDBC_URL THREADS BATCHES ROWS_PER_BATCH LOCK_NAME TTL");
            System.exit(2);
        }
        final String url = args[0];
        final int threads = Integer.parseInt(args[1]);
        final int batches = Integer.parseInt(args[2]);
        final int rows = Integer.parseInt(args[3]);
        final String name = args[4];
        final int ttl = Integer.parseInt(args[5]);

        ExecutorService pool = Executors.newFixedThreadPool(threads);
        CountDownLatch ready = new CountDownLatch(threads);
        CountDownLatch go = new CountDownLatch(1);
        List<Future<Integer>> results = new ArrayList<>();
        for (int t = 0; t < threads; t++) {
            final int thread = t;
            results.add(pool.submit(() -> run(url, thread, batches, rows, name, ttl, ready, go)));
        }
        // every connection is open before the first lock is taken (bounded,
        // so that a thread that failed to connect cannot hang the run)
        ready.await(60, TimeUnit.SECONDS);
        go.countDown();

        int total = 0;
        boolean failed = false;
        for (Future<Integer> f : results) {
            try {
                total += f.get();
            } catch (ExecutionException e) {
                failed = true;
                Throwable c = e.getCause();
                System.out.println("FAILED: " + c);
                if (c instanceof SQLException) {
                    SQLException s = (SQLException) c;
                    System.out.println("SQLSTATE " + s.getSQLState());
                    if (s.getNextException() != null)
                        System.out.println("next: " + s.getNextException());
                }
            }
        }
        pool.shutdown();
        pool.awaitTermination(10, TimeUnit.SECONDS);
        if (failed)
            System.exit(1);
        System.out.println("OK " + total);
    }

    static int run(String url, int thread, int batches, int rows, String name, int ttl,
                   CountDownLatch ready, CountDownLatch go) throws Exception {
        int written = 0;
        try (Connection conn = DriverManager.getConnection(url)) {
            conn.setAutoCommit(false);
            conn.setTransactionIsolation(Connection.TRANSACTION_READ_COMMITTED);
            try (PreparedStatement lock = conn.prepareStatement("SELECT etcd_xact_lock(?, ?)");
                 PreparedStatement token = conn.prepareStatement("SELECT etcd_lock_token(?)");
                 PreparedStatement insert = conn.prepareStatement(
                     "INSERT INTO guarded_rows (thread, batch, item, token) VALUES (?, ?, ?, ?)")) {
                ready.countDown();
                go.await();
                for (int b = 0; b < batches; b++) {
                    lock.setString(1, name);
                    lock.setInt(2, ttl);
                    String handle;
                    try (ResultSet rs = lock.executeQuery()) {
                        if (!rs.next())
                            throw new IllegalStateException("etcd_xact_lock returned no row");
                        handle = rs.getString(1);
                    }
                    if (handle == null || !handle.matches("etcd_lock/" + name + "/[0-9a-f]+"))
                        throw new IllegalStateException("unexpected handle " + handle);

                    token.setString(1, handle);
                    long fence;
                    try (ResultSet rs = token.executeQuery()) {
                        rs.next();
                        fence = rs.getLong(1);
                    }
                    if (fence <= 0)
                        throw new IllegalStateException("fencing token " + fence);

                    for (int i = 0; i < rows; i++) {
                        insert.setInt(1, thread);
                        insert.setInt(2, b);
                        insert.setInt(3, i);
                        insert.setLong(4, fence);
                        insert.addBatch();
                    }
                    int[] counts = insert.executeBatch();
                    if (counts.length != rows)
                        throw new IllegalStateException("batch ran " + counts.length + " of " + rows);
                    for (int c : counts)
                        if (c != 1 && c != Statement.SUCCESS_NO_INFO)
                            throw new IllegalStateException("a batch INSERT wrote " + c + " rows");
                    conn.commit();
                    written += rows;
                }
            } catch (Exception e) {
                try {
                    conn.rollback();
                } catch (SQLException ignored) {
                }
                throw e;
            }
        }
        return written;
    }
}
