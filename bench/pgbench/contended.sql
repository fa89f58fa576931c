-- (c) contended: every client on one name (:run, set with -D run=...).
-- Each target list is evaluated left to right, so ta is taken just after
-- etcd_lock returns and tr just before etcd_unlock is called.  The row is
-- written after the release, outside the critical section; release->acquire
-- gaps are computed from bench_handoff afterwards.
SELECT etcd_lock('bench/contended/:run') AS h, clock_timestamp() AS ta \gset
SELECT clock_timestamp() AS tr, etcd_unlock(':h') AS ok \gset
INSERT INTO bench_handoff(run, client, ta, tr) VALUES (':run', :client_id, ':ta', ':tr');
