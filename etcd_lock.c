/*-------------------------------------------------------------------------
 *
 * etcd_lock.c
 *		  Distributed locks held in etcd, taken from SQL: the module's
 *		  start-up and its SQL functions and views.
 *
 * This is the front door: every SQL function's C entry point is here, and
 * reads like the reference page of the SQL API.  The work is done below:
 * locks.c holds this backend's locks, recipe.c speaks etcd's lock recipe,
 * client.c talks to etcd over http.c, shmem.c keeps the shared tables and
 * worker.c renews the leases.  Each file defines the settings it reads;
 * _PG_init asks each to do so.
 *
 * IDENTIFICATION
 *		  etcd_lock.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <limits.h>

#include "fmgr.h"
#include "executor/executor.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/timestamp.h"

#include "client.h"
#include "http.h"
#include "locks.h"
#include "shmem.h"
#include "worker.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

/* etcd_lock.default_ttl, read by the lock functions' ttl argument */
static int	default_ttl = 30;

/* whether we were loaded through shared_preload_libraries */
static bool loaded = false;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;
static ExecutorStart_hook_type prev_ExecutorStart = NULL;

static void *
json_alloc(size_t size)
{
	return palloc(size);
}

static void
json_free(void *ptr)
{
	if (ptr)
		pfree(ptr);
}

static void
etcd_lock_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	etcd_shmem_request();
}

static void
etcd_lock_shmem_startup(void)
{
	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();
	etcd_shmem_startup();
}

/* A statement in a transaction whose etcd lock is lost fails at once. */
static void
etcd_lock_ExecutorStart(QueryDesc *queryDesc, int eflags)
{
	etcd_lock_check_doomed();
	if (prev_ExecutorStart)
		prev_ExecutorStart(queryDesc, eflags);
	else
		standard_ExecutorStart(queryDesc, eflags);
}

void
_PG_init(void)
{
	cJSON_Hooks hooks = {json_alloc, json_free};

	/* cJSON allocates in the current memory context, so errors leak nothing */
	cJSON_InitHooks(&hooks);

	/* each file defines the settings it reads */
	etcd_http_define_settings();
	etcd_client_define_settings();
	etcd_shmem_define_settings();
	etcd_locks_define_settings();

	DefineCustomIntVariable("etcd_lock.default_ttl",
							"Lease TTL of locks taken without a ttl argument.",
							"etcd keeps a lock this long after this server stops renewing it.",
							&default_ttl,
							30, 1, ETCD_LOCK_MAX_TTL,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);

	MarkGUCPrefixReserved("etcd_lock");

	if (!process_shared_preload_libraries_in_progress)
		return;
	loaded = true;

	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = etcd_lock_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = etcd_lock_shmem_startup;
	prev_ExecutorStart = ExecutorStart_hook;
	ExecutorStart_hook = etcd_lock_ExecutorStart;

	etcd_worker_register();
}

/* ----------------------------------------------------------------
 * Argument checks
 * ----------------------------------------------------------------
 */

static void
require_preload(void)
{
	if (!loaded || !etcd_shmem_ready())
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("etcd_lock must be loaded via shared_preload_libraries"),
				 errhint("Add etcd_lock to shared_preload_libraries in postgresql.conf and restart the server.")));
}

static char *
key_arg(FunctionCallInfo fcinfo, int argno)
{
	char	   *key;

	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("etcd lock name must not be null")));
	key = text_to_cstring(PG_GETARG_TEXT_PP(argno));
	if (key[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("etcd lock name must not be empty")));
	if (strlen(key) >= ETCD_LOCK_NAME_MAX)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("etcd lock name is too long"),
				 errdetail("A lock name can have at most %d bytes.", ETCD_LOCK_NAME_MAX - 1)));
	return key;
}

static int
ttl_arg(FunctionCallInfo fcinfo, int argno)
{
	int			ttl;

	if (PG_ARGISNULL(argno))
		return default_ttl;
	ttl = PG_GETARG_INT32(argno);
	if (ttl < 1 || ttl > ETCD_LOCK_MAX_TTL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("etcd lock ttl must be between 1 and %d seconds",
						ETCD_LOCK_MAX_TTL),
				 errdetail("The ttl given was %d.", ttl)));
	return ttl;
}

/* wait interval in ms; NULL means no wait */
static long
wait_arg(FunctionCallInfo fcinfo, int argno)
{
	Interval   *iv;
	int64		ms;

	if (PG_ARGISNULL(argno))
		return 0;
	iv = PG_GETARG_INTERVAL_P(argno);
	ms = iv->time / 1000 +
		((int64) iv->month * DAYS_PER_MONTH + iv->day) * SECS_PER_DAY * 1000;
	if (ms < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("etcd lock wait must not be negative")));
	return (long) Min(ms, (int64) INT_MAX);
}

/* ----------------------------------------------------------------
 * Locks
 * ----------------------------------------------------------------
 */

PG_FUNCTION_INFO_V1(etcd_lock_session);
PG_FUNCTION_INFO_V1(etcd_try_lock_session);
PG_FUNCTION_INFO_V1(etcd_lock_xact);
PG_FUNCTION_INFO_V1(etcd_try_lock_xact);
PG_FUNCTION_INFO_V1(etcd_unlock_session);
PG_FUNCTION_INFO_V1(etcd_unlock_all_session);
PG_FUNCTION_INFO_V1(etcd_lock_fencing_token);

/*
 * The four lock functions share their arguments (key, ttl[, wait]) and
 * differ in scope and in whether they give up after wait.
 */
static Datum
lock_common(FunctionCallInfo fcinfo, bool xact, bool try)
{
	char	   *key;
	int			ttl;
	long		wait_ms = -1;
	char	   *handle;

	require_preload();
	key = key_arg(fcinfo, 0);
	ttl = ttl_arg(fcinfo, 1);
	if (try)
		wait_ms = wait_arg(fcinfo, 2);
	handle = etcd_lock_acquire(key, ttl, xact, wait_ms);
	if (handle == NULL)
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(cstring_to_text(handle));
}

/*
 * etcd_lock(key text, ttl integer DEFAULT NULL) RETURNS text
 *
 * Wait for a session lock and return its handle, the etcd key it holds.
 */
Datum
etcd_lock_session(PG_FUNCTION_ARGS)
{
	return lock_common(fcinfo, false, false);
}

/*
 * etcd_try_lock(key text, ttl integer DEFAULT NULL, wait interval DEFAULT '0')
 *		RETURNS text
 *
 * The handle, or NULL if the lock is still held elsewhere after wait.
 */
Datum
etcd_try_lock_session(PG_FUNCTION_ARGS)
{
	return lock_common(fcinfo, false, true);
}

/*
 * etcd_xact_lock(key text, ttl integer DEFAULT NULL) RETURNS text
 *
 * A transaction lock: released when the transaction ends, after COMMIT is
 * durable and visible, or at once on ABORT.
 */
Datum
etcd_lock_xact(PG_FUNCTION_ARGS)
{
	return lock_common(fcinfo, true, false);
}

/*
 * etcd_try_xact_lock(key text, ttl integer DEFAULT NULL,
 *					  wait interval DEFAULT '0') RETURNS text
 */
Datum
etcd_try_lock_xact(PG_FUNCTION_ARGS)
{
	return lock_common(fcinfo, true, true);
}

/*
 * etcd_unlock(handle text) RETURNS boolean
 *
 * Release one hold of a session lock.  Only ever touches a key this session
 * created: the handle is looked up among this session's locks.
 */
Datum
etcd_unlock_session(PG_FUNCTION_ARGS)
{
	require_preload();
	PG_RETURN_BOOL(etcd_lock_release(text_to_cstring(PG_GETARG_TEXT_PP(0))));
}

/*
 * etcd_unlock_all() RETURNS integer
 *
 * Release every session lock of this session; return how many.
 */
Datum
etcd_unlock_all_session(PG_FUNCTION_ARGS)
{
	require_preload();
	PG_RETURN_INT32(etcd_lock_release_all());
}

/*
 * etcd_lock_token(handle text) RETURNS bigint
 *
 * The lock key's create_revision, which only grows from one holder to the
 * next: a fencing token for downstream writes.
 */
Datum
etcd_lock_fencing_token(PG_FUNCTION_ARGS)
{
	require_preload();
	PG_RETURN_INT64(etcd_lock_token(text_to_cstring(PG_GETARG_TEXT_PP(0))));
}

/* ----------------------------------------------------------------
 * Views
 * ----------------------------------------------------------------
 */

PG_FUNCTION_INFO_V1(etcd_lock_stats);
PG_FUNCTION_INFO_V1(etcd_lock_list);
PG_FUNCTION_INFO_V1(etcd_endpoint_health);

/* etcd_lock_stats(): one row of server-wide counters and gauges */
Datum
etcd_lock_stats(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[12];
	bool		nulls[12] = {0};
	EtcdStatsView st;
	int			i;

	require_preload();
	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");

	etcd_stats_read(&st);
	for (i = 0; i < ETCD_NSTATS; i++)
		values[i] = Int64GetDatum((int64) st.counters[i]);
	/* the counters' columns come in EtcdStat order, then the gauges */
	values[ETCD_NSTATS] = Int32GetDatum(st.leases);
	values[ETCD_NSTATS + 1] = Int32GetDatum(st.locks);
	values[ETCD_NSTATS + 2] = Int32GetDatum(st.revoking);
	values[ETCD_NSTATS + 3] = Int32GetDatum(st.worker_pid);
	nulls[ETCD_NSTATS + 3] = st.worker_pid == 0;
	values[ETCD_NSTATS + 4] = TimestampTzGetDatum(st.last_renewal);
	nulls[ETCD_NSTATS + 4] = st.last_renewal == 0;
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/*
 * etcd_endpoint_health(): one row per endpoint, like `etcdctl endpoint
 * health`.  Each endpoint gets one status request of its own.
 */
Datum
etcd_endpoint_health(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	int			n;
	int			i;

	InitMaterializedSRF(fcinfo, 0);
	n = etcd_endpoint_count();
	for (i = 0; i < n; i++)
	{
		Datum		values[6];
		bool		nulls[6] = {0};
		EtcdResult	res;
		TimestampTz start = GetCurrentTimestamp();
		Interval   *took = palloc0(sizeof(Interval));
		bool		ok;

		ok = etcd_request_endpoint(i, "/v3/maintenance/status", cJSON_CreateObject(), &res);
		took->time = GetCurrentTimestamp() - start;

		values[0] = CStringGetTextDatum(etcd_endpoint(i));
		values[2] = IntervalPGetDatum(took);
		if (ok)
		{
			cJSON	   *version = cJSON_GetObjectItemCaseSensitive(res.json, "version");
			cJSON	   *leader = cJSON_GetObjectItemCaseSensitive(res.json, "leader");
			cJSON	   *member = etcd_json_get(res.json, "header.member_id");
			bool		has_leader;

			/*
			 * Member IDs are uint64 and may not fit an int64: compare them as
			 * the strings etcd sends.  No leader (zero) is left out.
			 */
			has_leader = cJSON_IsString(leader) && strcmp(leader->valuestring, "0") != 0;
			values[1] = BoolGetDatum(has_leader);
			values[3] = BoolGetDatum(has_leader && cJSON_IsString(member) &&
									 strcmp(leader->valuestring, member->valuestring) == 0);
			if (cJSON_IsString(version))
				values[4] = CStringGetTextDatum(version->valuestring);
			else
				nulls[4] = true;
			if (has_leader)
				nulls[5] = true;
			else
				values[5] = CStringGetTextDatum("no leader");
		}
		else
		{
			values[1] = BoolGetDatum(false);
			nulls[3] = nulls[4] = true;
			values[5] = CStringGetTextDatum(res.error ? res.error : "unknown error");
		}
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

/* etcd_locks(): every lock held or waited for on this server */
Datum
etcd_lock_list(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	EtcdLockRow *rows;
	int			n;
	int			i;

	require_preload();
	InitMaterializedSRF(fcinfo, 0);

	/* copied under the lock, turned into tuples after */
	rows = palloc(sizeof(EtcdLockRow) * etcd_lock_max_locks);
	n = etcd_lock_rows(rows);

	for (i = 0; i < n; i++)
	{
		EtcdLockRow *s = &rows[i];
		Datum		values[10];
		bool		nulls[10] = {0};
		const char *state;
		const char *scope;

		if (s->state == ETCD_LOCK_LOST)
			state = "lost";
		else if (s->state == ETCD_LOCK_WAITING)
			state = "waiting";
		else
			state = "held";

		values[0] = Int32GetDatum(s->pid);
		values[1] = CStringGetTextDatum(s->name);
		values[2] = CStringGetTextDatum(s->handle);
		values[3] = Int64GetDatum(s->lease_id);
		values[4] = Int32GetDatum(s->ttl);
		if (s->session_count > 0)
			scope = "session";
		else if (s->xact_count > 0 || s->xact)
			scope = "transaction";
		else
			scope = "session";
		values[5] = CStringGetTextDatum(scope);
		values[6] = CStringGetTextDatum(state);
		values[7] = Int32GetDatum(s->session_count + s->xact_count);
		if (s->acquired_at != 0)
		{
			values[8] = Int64GetDatum(s->fencing_token);
			values[9] = TimestampTzGetDatum(s->acquired_at);
		}
		else
			nulls[8] = nulls[9] = true;
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}
