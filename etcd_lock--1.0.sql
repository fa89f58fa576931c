/* etcd_lock--1.0.sql */

-- complain if script is sourced in psql, rather than via CREATE EXTENSION
\echo Use "CREATE EXTENSION etcd_lock" to load this file. \quit

-- Session locks.  Not STRICT: a NULL ttl means etcd_lock.default_ttl, and a
-- NULL key is an error rather than a silent NULL.
CREATE FUNCTION etcd_lock(key text, ttl integer DEFAULT NULL)
RETURNS text
AS 'MODULE_PATHNAME', 'etcd_lock_session'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

CREATE FUNCTION etcd_try_lock(key text, ttl integer DEFAULT NULL,
                              wait interval DEFAULT '0')
RETURNS text
AS 'MODULE_PATHNAME', 'etcd_try_lock_session'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

CREATE FUNCTION etcd_unlock(handle text)
RETURNS boolean
AS 'MODULE_PATHNAME', 'etcd_unlock_session'
LANGUAGE C STRICT VOLATILE PARALLEL UNSAFE;

CREATE FUNCTION etcd_unlock_all()
RETURNS integer
AS 'MODULE_PATHNAME', 'etcd_unlock_all_session'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

-- Transaction locks: released when the transaction ends (after COMMIT is
-- durable and visible, or at once on ABORT).
CREATE FUNCTION etcd_xact_lock(key text, ttl integer DEFAULT NULL)
RETURNS text
AS 'MODULE_PATHNAME', 'etcd_lock_xact'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

CREATE FUNCTION etcd_try_xact_lock(key text, ttl integer DEFAULT NULL,
                                   wait interval DEFAULT '0')
RETURNS text
AS 'MODULE_PATHNAME', 'etcd_try_lock_xact'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

-- The lock key's create_revision: a fencing token that only grows.
CREATE FUNCTION etcd_lock_token(handle text)
RETURNS bigint
AS 'MODULE_PATHNAME', 'etcd_lock_fencing_token'
LANGUAGE C STRICT VOLATILE PARALLEL UNSAFE;

-- Observability
CREATE FUNCTION etcd_lock_stats(
    OUT requests bigint,
    OUT keepalives bigint,
    OUT lease_grants bigint,
    OUT acquired bigint,
    OUT released bigint,
    OUT lost bigint,
    OUT failures bigint,
    OUT leases integer,
    OUT locks integer,
    OUT revoking integer,
    OUT worker_pid integer,
    OUT last_renewal timestamptz)
RETURNS record
AS 'MODULE_PATHNAME', 'etcd_lock_stats'
LANGUAGE C VOLATILE PARALLEL RESTRICTED;

CREATE VIEW etcd_lock_stats AS SELECT * FROM etcd_lock_stats();

CREATE FUNCTION etcd_locks(
    OUT pid integer,
    OUT key text,
    OUT handle text,
    OUT lease_id bigint,
    OUT ttl integer,
    OUT scope text,
    OUT state text,
    OUT count integer,
    OUT fencing_token bigint,
    OUT acquired_at timestamptz)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'etcd_lock_list'
LANGUAGE C VOLATILE PARALLEL RESTRICTED;

CREATE VIEW etcd_locks AS SELECT * FROM etcd_locks();

-- The SQL twin of `etcdctl endpoint health`: one status request per endpoint.
CREATE FUNCTION etcd_endpoint_health(
    OUT endpoint text,
    OUT healthy boolean,
    OUT took interval,
    OUT is_leader boolean,
    OUT version text,
    OUT error text)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'etcd_endpoint_health'
LANGUAGE C VOLATILE PARALLEL RESTRICTED;

-- It sends requests to etcd: for monitoring roles, not for everyone.
REVOKE ALL ON FUNCTION etcd_endpoint_health() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION etcd_endpoint_health() TO pg_monitor;

-- Like pg_locks, these views are for everyone to read.
GRANT SELECT ON etcd_lock_stats, etcd_locks TO PUBLIC;
