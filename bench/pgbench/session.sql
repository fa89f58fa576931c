-- (a) uncontended session lock and unlock: each client on its own name.
-- pgbench substitutes :h inside the literal (its variables are textual).
SELECT etcd_lock('bench/session/' || :client_id) AS h \gset
SELECT etcd_unlock(':h');
