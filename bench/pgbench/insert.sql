-- reference for (b): the same transaction without the lock.
BEGIN;
INSERT INTO bench_items(client, at) VALUES (:client_id, now());
COMMIT;
