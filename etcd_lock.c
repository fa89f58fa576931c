/*-------------------------------------------------------------------------
 *
 * etcd_lock.c
 *		  Distributed locks held in etcd, taken from SQL: the module's
 *		  settings, its start-up, and its SQL functions.
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

#include "etcd_lock.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

/* GUC variables */
char	   *etcd_lock_endpoints = NULL;
int			etcd_lock_request_timeout = 2000;
int			etcd_lock_max_locks = 1024;
char	   *etcd_lock_prefix = NULL;
int			etcd_lock_default_ttl = 30;
bool		etcd_lock_commit_check = true;
char	   *etcd_lock_cacert = NULL;
char	   *etcd_lock_cert = NULL;
char	   *etcd_lock_key = NULL;
char	   *etcd_lock_user = NULL;
char	   *etcd_lock_password = NULL;

/* whether we were loaded through shared_preload_libraries */
bool		etcd_lock_loaded = false;

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

static bool
check_endpoints(char **newval, void **extra, GucSource source)
{
	char	   *copy = pstrdup(*newval);
	char	   *tok;
	char	   *save;
	int			n = 0;

	for (tok = strtok_r(copy, ", \t", &save); tok; tok = strtok_r(NULL, ", \t", &save))
	{
		const char *path;

		if (strncmp(tok, "http://", 7) != 0 && strncmp(tok, "https://", 8) != 0)
		{
			GUC_check_errdetail("Endpoint \"%s\" is not an http:// or https:// URL.", tok);
			pfree(copy);
			return false;
		}

		/*
		 * Paths are appended as "/v3/...".  With a path of its own, etcd 3.5
		 * answers 404 "Not Found" as JSON with code 5, which reads like its
		 * own "lease not found".
		 */
		path = strchr(strstr(tok, "://") + 3, '/');
		if (path != NULL && strspn(path, "/") != strlen(path))
		{
			GUC_check_errdetail("Endpoint \"%s\" has a path; give the scheme, host and port only.", tok);
			pfree(copy);
			return false;
		}
		n++;
	}
	pfree(copy);
	if (n == 0)
	{
		GUC_check_errdetail("At least one endpoint is required.");
		return false;
	}
	return true;
}

static void
assign_endpoints(const char *newval, void *extra)
{
	etcd_endpoints_changed();
	if (etcd_lock_endpoints == NULL || strcmp(etcd_lock_endpoints, newval) != 0)
	{
		/* a token belongs to one cluster; another etcd may hang on it */
		etcd_auth_reset();

		/*
		 * Pooled connections belong to the old endpoints: libcurl 8 reuses
		 * an https connection for an http:// URL to the same host and port.
		 */
		etcd_tls_changed();
	}
}

/*
 * etcd's recipe appends "/" to a lock name, so a prefix ending in "/" keeps
 * every name inside its own subtree: no name can reach a key outside it.
 */
static bool
check_prefix(char **newval, void **extra, GucSource source)
{
	size_t		len = strlen(*newval);

	if (len >= ETCD_LOCK_PREFIX_MAX)
	{
		GUC_check_errdetail("The prefix must be shorter than %d bytes.", ETCD_LOCK_PREFIX_MAX);
		return false;
	}
	if (len > 0 && (*newval)[len - 1] != '/')
	{
		GUC_check_errdetail("A non-empty prefix must end with \"/\".");
		return false;
	}
	return true;
}

/*
 * Assign hooks run on every reload, changed or not; the variable still holds
 * the old value while they run.
 */
static bool
string_changed(const char *oldval, const char *newval)
{
	return oldval == NULL || strcmp(oldval, newval) != 0;
}

/* new TLS files: pooled connections were made with the old ones */
static void
assign_cacert(const char *newval, void *extra)
{
	if (string_changed(etcd_lock_cacert, newval))
		etcd_tls_changed();
}

static void
assign_cert(const char *newval, void *extra)
{
	if (string_changed(etcd_lock_cert, newval))
		etcd_tls_changed();
}

static void
assign_key(const char *newval, void *extra)
{
	if (string_changed(etcd_lock_key, newval))
		etcd_tls_changed();
}

/* new credentials: authenticate again at the next request */
static void
assign_user(const char *newval, void *extra)
{
	if (string_changed(etcd_lock_user, newval))
		etcd_auth_reset();
}

static void
assign_password(const char *newval, void *extra)
{
	if (string_changed(etcd_lock_password, newval))
		etcd_auth_reset();
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

	DefineCustomStringVariable("etcd_lock.endpoints",
							   "Comma-separated list of etcd client URLs.",
							   "When one does not answer, the next one is tried.",
							   &etcd_lock_endpoints,
							   "http://127.0.0.1:2379",
							   PGC_SIGHUP, 0,
							   check_endpoints, assign_endpoints, NULL);

	DefineCustomIntVariable("etcd_lock.request_timeout",
							"Time limit for one request to one etcd endpoint.",
							NULL,
							&etcd_lock_request_timeout,
							2000, 10, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_MS,
							NULL, NULL, NULL);

	/* a PGC_POSTMASTER setting can only be defined while preloading */
	if (process_shared_preload_libraries_in_progress)
		DefineCustomIntVariable("etcd_lock.max_locks",
								"Maximum number of etcd locks, and of leases, on this server.",
								NULL,
								&etcd_lock_max_locks,
								1024, 16, 1000000,
								PGC_POSTMASTER, 0,
								NULL, NULL, NULL);

	DefineCustomStringVariable("etcd_lock.prefix",
							   "Namespace prepended to every lock name in etcd.",
							   "Empty, or ending in \"/\". Empty maps names 1:1 onto etcd's.",
							   &etcd_lock_prefix,
							   "etcd_lock/",
							   PGC_SUSET, 0,
							   check_prefix, NULL, NULL);

	DefineCustomIntVariable("etcd_lock.default_ttl",
							"Lease TTL of locks taken without a ttl argument.",
							"etcd keeps a lock this long after this server stops renewing it.",
							&etcd_lock_default_ttl,
							30, 1, ETCD_LOCK_MAX_TTL,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomStringVariable("etcd_lock.cacert",
							   "CA file that https:// endpoints' certificates are verified against.",
							   "Empty means the system's CAs. Verification cannot be turned off.",
							   &etcd_lock_cacert,
							   "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY,
							   NULL, assign_cacert, NULL);

	DefineCustomStringVariable("etcd_lock.cert",
							   "Client certificate file presented to etcd (mTLS).",
							   NULL,
							   &etcd_lock_cert,
							   "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY,
							   NULL, assign_cert, NULL);

	DefineCustomStringVariable("etcd_lock.key",
							   "Private key file of etcd_lock.cert.",
							   NULL,
							   &etcd_lock_key,
							   "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY,
							   NULL, assign_key, NULL);

	DefineCustomStringVariable("etcd_lock.user",
							   "etcd user to authenticate as; empty sends no credentials.",
							   NULL,
							   &etcd_lock_user,
							   "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY,
							   NULL, assign_user, NULL);

	DefineCustomStringVariable("etcd_lock.password",
							   "Password of etcd_lock.user.",
							   NULL,
							   &etcd_lock_password,
							   "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY,
							   NULL, assign_password, NULL);

	DefineCustomBoolVariable("etcd_lock.commit_check",
							 "Confirms with etcd before COMMIT that every transaction lock is still held.",
							 "Costs one request per transaction; without it a lock lost unnoticed lets the transaction commit.",
							 &etcd_lock_commit_check,
							 true,
							 PGC_USERSET, 0,
							 NULL, NULL, NULL);

	MarkGUCPrefixReserved("etcd_lock");

	if (!process_shared_preload_libraries_in_progress)
		return;
	etcd_lock_loaded = true;

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
	if (!etcd_lock_loaded || !etcd_shmem_ready())
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
		return etcd_lock_default_ttl;
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
