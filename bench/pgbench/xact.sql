-- (b) uncontended transaction lock around an INSERT (the saveAll shape):
-- released at COMMIT.
BEGIN;
SELECT etcd_xact_lock('bench/xact/' || :client_id);
INSERT INTO bench_items(client, at) VALUES (:client_id, now());
COMMIT;
