-- (a') the same lock and unlock in ONE statement: (a) minus one PostgreSQL
-- round trip, to show what the SQL interface itself costs.
SELECT etcd_unlock(etcd_lock('bench/session1/' || :client_id));
