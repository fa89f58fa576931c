--
-- etcd_lock: what one session sees.  Runs against a real etcd started by
-- scripts/test.sh; handles carry a lease ID, so they are matched by pattern.
--
CREATE EXTENSION etcd_lock;

-- errors are shown as SQLSTATE and message, whatever the verbosity
CREATE FUNCTION expect_error(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE q;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END $$;

SHOW etcd_lock.prefix;
SHOW etcd_lock.default_ttl;

-- a session lock, and its handle: the etcd key it holds
SELECT etcd_lock('orders') AS h \gset
SELECT :'h' ~ '^etcd_lock/orders/[0-9a-f]+$' AS handle_is_etcd_key;
SELECT key, handle = :'h' AS same_handle, ttl, scope, state, count,
       fencing_token > 0 AS has_token, acquired_at <= now() AS acquired
  FROM etcd_locks WHERE pid = pg_backend_pid();

-- reentrant: the same handle, the count goes up, no second key
SELECT etcd_lock('orders', 60) = :'h' AS same_handle;
SELECT etcd_try_lock('orders') = :'h' AS same_handle;
SELECT count FROM etcd_locks WHERE pid = pg_backend_pid();
SELECT etcd_unlock(:'h'), etcd_unlock(:'h');
SELECT count FROM etcd_locks WHERE pid = pg_backend_pid();
SELECT etcd_unlock(:'h');
SELECT count(*) AS locks_left FROM etcd_locks WHERE pid = pg_backend_pid();

-- unlocking what this session does not hold: false and a WARNING
SET client_min_messages = error;
SELECT etcd_unlock(:'h') AS released_again;
RESET client_min_messages;
SELECT etcd_unlock('etcd_lock/orders/1');
SELECT etcd_unlock('some/key/of/somebody/else');
-- a huge handle is not echoed back whole: cut to 403 bytes and "..."
SELECT etcd_unlock(repeat('x', 100000));
SELECT etcd_lock_token(repeat('y', 100000));

-- try_lock on a free name takes it at once
SELECT etcd_try_lock('free', 10) ~ '^etcd_lock/free/[0-9a-f]+$' AS took_it;
SELECT etcd_try_lock('free2', NULL, '50 ms') IS NOT NULL AS took_it;
SELECT key, ttl, state FROM etcd_locks WHERE pid = pg_backend_pid() ORDER BY key;
SELECT etcd_unlock_all();
SELECT etcd_unlock_all();
SELECT count(*) AS locks_left FROM etcd_locks WHERE pid = pg_backend_pid();

-- in steady state, a lock and an unlock cost two HTTP requests
SELECT etcd_unlock(etcd_lock('warm-up'));
SELECT requests - keepalives AS r0, lease_grants AS g0 FROM etcd_lock_stats \gset
SELECT etcd_unlock(etcd_lock('cycle'));
SELECT (requests - keepalives) - :r0 AS requests_per_cycle,
       lease_grants - :g0 AS grants_per_cycle
  FROM etcd_lock_stats;

-- bad input
SELECT expect_error($$SELECT etcd_lock('')$$);
SELECT expect_error($$SELECT etcd_lock(NULL)$$);
SELECT expect_error($$SELECT etcd_lock('x', 0)$$);
SELECT expect_error($$SELECT etcd_lock('x', -5)$$);
-- the ttl has a maximum, and no value overflows the time arithmetic
SELECT expect_error($$SELECT etcd_lock('x', 86401)$$);
SELECT expect_error($$SELECT etcd_lock('x', 2147483647)$$);
-- an endpoint is scheme, host and port: "/v3/..." is appended to it
ALTER SYSTEM SET etcd_lock.endpoints = 'http://127.0.0.1:2379/v3';
SELECT expect_error($$SELECT etcd_try_lock('x', 5, '-1 second')$$);
SELECT expect_error($$SELECT etcd_lock(repeat('n', 300))$$);
SELECT etcd_unlock(NULL);
SELECT count(*) AS locks_left FROM etcd_locks WHERE pid = pg_backend_pid();

-- the prefix: superuser only, empty or ending in "/"
SELECT expect_error($$SET etcd_lock.prefix = 'no-slash'$$);
SET etcd_lock.prefix = '';
SELECT etcd_lock('plain/name') ~ '^plain/name/[0-9a-f]+$' AS one_to_one;
SELECT etcd_unlock_all();
SET etcd_lock.prefix = 'team-a/';
SELECT etcd_lock('n') ~ '^team-a/n/[0-9a-f]+$' AS under_prefix;
SELECT etcd_unlock_all();
RESET etcd_lock.prefix;
CREATE ROLE regress_etcd_lock_user;
SET ROLE regress_etcd_lock_user;
SELECT expect_error($$SET etcd_lock.prefix = ''$$);
SELECT expect_error($$SET etcd_lock.endpoints = 'http://127.0.0.1:1'$$);
-- the wording differs between PostgreSQL 15 and 17: the SQLSTATE only
SELECT left(expect_error($$SHOW etcd_lock.password_file$$), 5) AS show_password_file;
-- an ordinary user can lock, and sees its lock in the views
SELECT etcd_lock('user-lock') AS uh \gset
SELECT key, state, handle = :'uh' AS same_handle FROM etcd_locks WHERE pid = pg_backend_pid();
SELECT worker_pid > 0 AS worker_runs, locks >= 1 AS lock_counted FROM etcd_lock_stats;
SELECT etcd_unlock(:'uh');
RESET ROLE;
DROP ROLE regress_etcd_lock_user;

SELECT lost, failures FROM etcd_lock_stats;
