--
-- Transaction locks, seen from one session.
--
CREATE TABLE guarded (id int, note text);

-- released at COMMIT; etcd_unlock refuses a transaction lock
BEGIN;
SELECT etcd_xact_lock('com.example.Order', 30) AS h \gset
SELECT key, scope, state, count FROM etcd_locks WHERE pid = pg_backend_pid();
\set VERBOSITY terse
SELECT etcd_unlock(:'h');
\set VERBOSITY default
SELECT etcd_lock_token(:'h') > 0 AS has_token;
INSERT INTO guarded VALUES (1, 'saveAll');
COMMIT;
SELECT count(*) AS locks_left FROM etcd_locks WHERE pid = pg_backend_pid();

-- released at ABORT
BEGIN;
SELECT etcd_xact_lock('com.example.Order') IS NOT NULL AS locked;
ROLLBACK;
SELECT count(*) AS locks_left FROM etcd_locks WHERE pid = pg_backend_pid();

-- outside a transaction block the lock covers the statement's transaction
SELECT etcd_xact_lock('implicit') IS NOT NULL AS locked;
SELECT count(*) AS locks_left FROM etcd_locks WHERE pid = pg_backend_pid();

-- savepoints: rolled back releases, released belongs to the parent
BEGIN;
SAVEPOINT a;
SELECT etcd_xact_lock('sp-rolled-back') IS NOT NULL AS locked;
ROLLBACK TO a;
SELECT key FROM etcd_locks WHERE pid = pg_backend_pid();
SAVEPOINT b;
SELECT etcd_xact_lock('sp-released') IS NOT NULL AS locked;
SAVEPOINT c;
SELECT etcd_xact_lock('sp-released') IS NOT NULL AS locked_again;
RELEASE c;
RELEASE b;
SELECT key, count FROM etcd_locks WHERE pid = pg_backend_pid();
SAVEPOINT d;
SELECT etcd_xact_lock('sp-released') IS NOT NULL AS third_hold;
ROLLBACK TO d;
SELECT key, count FROM etcd_locks WHERE pid = pg_backend_pid();
COMMIT;
SELECT count(*) AS locks_left FROM etcd_locks WHERE pid = pg_backend_pid();

-- session and transaction holds stack on one key
SELECT etcd_lock('stacked') AS sh \gset
BEGIN;
SELECT etcd_xact_lock('stacked') = :'sh' AS same_key;
SELECT key, scope, count FROM etcd_locks WHERE pid = pg_backend_pid();
COMMIT;
SELECT key, scope, count FROM etcd_locks WHERE pid = pg_backend_pid();
BEGIN;
SELECT etcd_xact_lock('stacked') = :'sh' AS same_key;
SELECT etcd_unlock(:'sh') AS session_hold_released;
SELECT key, scope, count FROM etcd_locks WHERE pid = pg_backend_pid();
COMMIT;
SELECT count(*) AS locks_left FROM etcd_locks WHERE pid = pg_backend_pid();

-- a try that succeeds at once
BEGIN;
SELECT etcd_try_xact_lock('try-me', 10, '100 ms') IS NOT NULL AS locked;
COMMIT;

-- PREPARE TRANSACTION is refused while transaction locks are held
BEGIN;
SELECT etcd_xact_lock('prepared') IS NOT NULL AS locked;
PREPARE TRANSACTION 'etcd_lock_regress';
SELECT count(*) AS locks_left FROM etcd_locks WHERE pid = pg_backend_pid();

-- the fencing token of a handle this session does not hold
SELECT expect_error($$SELECT etcd_lock_token('etcd_lock/nope/1')$$);

-- request counts: acquire + commit check + release = 3; without the check, 2
BEGIN; SELECT etcd_xact_lock('warm-up') IS NOT NULL AS locked; COMMIT;
SELECT requests - keepalives AS r0 FROM etcd_lock_stats \gset
BEGIN;
SELECT etcd_xact_lock('cycle') IS NOT NULL AS locked;
INSERT INTO guarded VALUES (2, 'cycle');
COMMIT;
SELECT (requests - keepalives) - :r0 AS requests_with_check FROM etcd_lock_stats;
SET etcd_lock.commit_check = off;
SELECT requests - keepalives AS r0 FROM etcd_lock_stats \gset
BEGIN;
SELECT etcd_xact_lock('cycle') IS NOT NULL AS locked;
INSERT INTO guarded VALUES (3, 'cycle');
COMMIT;
SELECT (requests - keepalives) - :r0 AS requests_without_check FROM etcd_lock_stats;
RESET etcd_lock.commit_check;

SELECT id, note FROM guarded ORDER BY id;
DROP TABLE guarded;
