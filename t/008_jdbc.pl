# A JDBC client (Debian's libpostgresql-jdbc-java) guards batch inserts with
# etcd_xact_lock through prepared statements: 4 connections, one per thread,
# each writing 25 batches of 20 rows with autocommit off; each batch is one
# transaction that takes etcd_xact_lock(?, ?), tags its rows with the fencing
# token from etcd_lock_token(handle), runs addBatch/executeBatch and commits.
# The source is t/jdbc/GuardedBatch.java, compiled with javac at test time.
#
# Checks: every row is there; each batch is one transaction whose rows have
# contiguous ids (no other batch interleaved); in commit order (commit
# timestamps, track_commit_timestamp = on) the batches' id ranges and their
# fencing tokens strictly increase; nothing is left in etcd.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use EtcdLockTest;
use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

my $JAR = '/usr/share/java/postgresql.jar';
my $THREADS = 4;
my $BATCHES = 25;
my $ROWS = 20;
my $TOTAL = $THREADS * $BATCHES * $ROWS;

plan skip_all => 'javac is not installed (package default-jdk-headless)'
  unless have_command('javac');
plan skip_all => "the JDBC driver $JAR is not installed (package libpostgresql-jdbc-java)"
  unless -r $JAR;

# compile the client
my $classes = PostgreSQL::Test::Utils::tempdir('jdbc_classes');
my ($out, $err) = ('', '');
ok( IPC::Run::run(
		[ 'javac', '-cp', $JAR, '-d', $classes, "$FindBin::RealBin/jdbc/GuardedBatch.java" ],
		'<', \undef, '>', \$out, '2>', \$err),
	'GuardedBatch.java compiles') or die "javac failed: $out$err";

my $etcd = EtcdLockTest::Etcd->new(name => 'jdbc');
# JDBC speaks TCP only: listen on loopback too, on the node's port
my $node = pg_node('jdbc', $etcd->url, qq{
listen_addresses = '127.0.0.1'
track_commit_timestamp = on
});
$node->append_conf('pg_hba.conf', "host all all 127.0.0.1/32 trust\n");
$node->reload;

$node->safe_psql('postgres', q{
CREATE TABLE guarded_rows (
    id bigserial PRIMARY KEY,
    thread int NOT NULL,
    batch int NOT NULL,
    item int NOT NULL,
    token bigint NOT NULL);
});
my $user = $node->safe_psql('postgres', 'SELECT current_user');
my $acquired0 = $node->safe_psql('postgres', 'SELECT acquired FROM etcd_lock_stats');

# prepareThreshold=1: server-side prepared statements from the first use
my $url = 'jdbc:postgresql://127.0.0.1:' . $node->port
  . "/postgres?user=$user&prepareThreshold=1&ApplicationName=GuardedBatch";
my $t0 = time;
($out, $err) = ('', '');
my $ran = IPC::Run::run(
	[ 'java', '-cp', "$classes:$JAR", 'GuardedBatch', $url, $THREADS, $BATCHES, $ROWS,
	  'com.example.Batch', 30 ],
	'<', \undef, '>', \$out, '2>', \$err,
	IPC::Run::timeout($PostgreSQL::Test::Utils::timeout_default));
my $secs = time - $t0;
ok($ran, 'the JDBC client succeeded') or diag("stdout:\n$out\nstderr:\n$err");
like($out, qr/^OK $TOTAL$/m, "the client wrote $TOTAL rows");
note sprintf('JDBC: %d batches of %d rows in %.2f s (JVM start included)',
	$THREADS * $BATCHES, $ROWS, $secs);

# log_statement = all shows the server-side prepared statements at work
my $log = PostgreSQL::Test::Utils::slurp_file($node->logfile);
my $lock_execs = () = $log =~ /GuardedBatch LOG:  execute S_\d+: SELECT etcd_xact_lock\(\$1, \$2\)/g;
my $insert_execs = () = $log =~ /GuardedBatch LOG:  execute S_\d+: INSERT INTO guarded_rows/g;
is($lock_execs, $THREADS * $BATCHES, 'etcd_xact_lock ran as a named prepared statement, once per batch');
is($insert_execs, $TOTAL, 'the batch INSERTs ran as a named prepared statement');

is($node->safe_psql('postgres', 'SELECT count(*) FROM guarded_rows'), $TOTAL,
	'all rows are present');
is($node->safe_psql('postgres', 'SELECT count(DISTINCT (thread, batch, item)) FROM guarded_rows'),
	$TOTAL, 'each row once');
is($node->safe_psql('postgres', 'SELECT acquired FROM etcd_lock_stats') - $acquired0,
	$THREADS * $BATCHES, 'one etcd lock acquisition per batch');

# one row per batch, in commit order
$node->safe_psql('postgres', q{
CREATE TABLE batches AS
SELECT thread, batch, count(*) AS n,
       count(DISTINCT xmin::text) AS xacts,
       count(DISTINCT token) AS tokens,
       min(token) AS token,
       min(id) AS first_id, max(id) AS last_id,
       max(pg_xact_commit_timestamp(xmin)) AS committed
FROM guarded_rows
GROUP BY thread, batch;
});
is($node->safe_psql('postgres', 'SELECT count(*) FROM batches'), $THREADS * $BATCHES,
	'every batch is there');
is($node->safe_psql('postgres', qq{
SELECT count(*) FROM batches
WHERE n <> $ROWS OR xacts <> 1 OR tokens <> 1 OR committed IS NULL}), '0',
	'each batch is one committed transaction with one fencing token');
is($node->safe_psql('postgres', qq{
SELECT count(*) FROM batches WHERE last_id - first_id + 1 <> $ROWS}), '0',
	'each batch has contiguous ids: no other batch interleaved');
is($node->safe_psql('postgres', q{
SELECT count(*) FROM (
    SELECT committed, token, first_id,
           lag(committed) OVER w AS prev_committed,
           lag(token) OVER w AS prev_token,
           lag(last_id) OVER w AS prev_last_id
    FROM batches WINDOW w AS (ORDER BY committed)) s
WHERE prev_committed IS NOT NULL
  AND (committed <= prev_committed OR token <= prev_token OR first_id <= prev_last_id)}), '0',
	'in commit order, the fencing tokens and the id ranges strictly increase');
cmp_ok($node->safe_psql('postgres', q{
SELECT count(*) FROM (
    SELECT thread, lag(thread) OVER (ORDER BY committed) AS prev FROM batches) s
WHERE thread <> prev}), '>', 0, 'the threads took turns');

# the connections are closed: nothing left behind
ok($node->poll_query_until('postgres', 'SELECT locks = 0 AND leases = 0 FROM etcd_lock_stats'),
	'no lock or lease left on the server');
$etcd->wait_empty('etcd_lock/');
$etcd->no_leftovers('the connections closed', 'etcd_lock/');
unlike(PostgreSQL::Test::Utils::slurp_file($node->logfile),
	qr/terminated by signal|PANIC|TRAP:/, 'no backend crashed');

$node->stop;
done_testing();
