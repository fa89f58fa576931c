-- (d) the local reference: PostgreSQL's own advisory lock, same shape as (a).
SELECT pg_advisory_lock(:client_id);
SELECT pg_advisory_unlock(:client_id);
