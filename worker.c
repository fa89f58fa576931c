/*-------------------------------------------------------------------------
 *
 * worker.c
 *		  The lease worker: keeps alive every lease that backends registered
 *		  in shared memory, declares lost the ones that cannot be kept, and
 *		  revokes the ones given up.
 *
 * Renewal works within each lease's budget, the time until etcd may expire
 * it (expires_at, from the send time of the last answered keepalive):
 *	- a keepalive is due a third of a TTL after the last renewal;
 *	- every attempt's timeout is cut to the budget left, so no attempt can
 *	  still be in flight when the lease may have expired;
 *	- an attempt unanswered after a third of its timeout is hedged: another
 *	  goes to another member (up to MAX_ATTEMPTS at once), and the slow
 *	  member is tried last for a while, by backends and the worker alike;
 *	- an attempt that fails outright is retried at once on the next member.
 * A lease is declared lost only when etcd answers that it is gone, or once
 * its budget is spent with no attempt left in flight.  With the defaults
 * (ttl 5, request_timeout 2 s) that leaves room for several attempts, on
 * different members, within every TTL.
 *
 * Keepalives carry no auth token: etcd does not check auth for them.
 * Revokes do; the worker authenticates on a transfer of its own, so a
 * member that hangs never stalls the keepalives.
 *
 * IDENTIFICATION
 *		  worker.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "client.h"
#include "http.h"
#include "shmem.h"
#include "worker.h"

/* requests in flight at once; per lease; and revokes, so keepalives get room */
#define MAX_IN_FLIGHT	64
#define MAX_ATTEMPTS	3
#define MAX_REVOKES		(MAX_IN_FLIGHT / 2)

/* an attempt is not worth sending with less time than this left */
#define MIN_ATTEMPT_MS	50

/* after a failed attempt, the next one waits this long at least */
#define RETRY_MS		100

/* a failed revoke or authentication is retried after this long */
#define REVOKE_RETRY_MS 500

typedef enum AttemptKind
{
	ATTEMPT_KEEPALIVE,
	ATTEMPT_REVOKE,
	ATTEMPT_AUTH
} AttemptKind;

/* the etcd request of each kind of attempt */
static const char *const attempt_paths[] = {
	"/v3/lease/keepalive", "/v3/lease/revoke", "/v3/auth/authenticate"
};

/* One request in flight. */
typedef struct Attempt
{
	EtcdTransfer *transfer;		/* created on first use, then reused */
	bool		in_use;
	AttemptKind kind;
	int			slot;
	int64		lease_id;
	int			endpoint;
	TimestampTz sent_at;
	bool		cut_short;		/* timeout below request_timeout (budget) */
} Attempt;

static Attempt attempts[MAX_IN_FLIGHT];
static EtcdMulti *multi;
static int	tls_generation = 0;	/* of the TLS files multi's pool was made with */

/*
 * Per lease slot: when the next attempt may start, for the lease it was
 * set for (a slot can be freed and reused for another lease meanwhile).
 */
static int64 *slot_lease;
static TimestampTz *slot_next_attempt;
static int	nrevokes = 0;

static bool auth_in_flight = false;
/* a password file problem is logged once per setting of the credentials */
static int	password_reported = -1;	/* etcd_auth_generation() when logged */
static TimestampTz auth_retry_at = 0;

static EtcdLeaseView *views;

void
etcd_worker_register(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	/*
	 * Connected to no database, only so that it has a row in
	 * pg_stat_activity and pg_terminate_backend() can restart it; that needs
	 * the server to have reached a consistent state first.
	 */
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_ConsistentState;
	worker.bgw_restart_time = 1;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "etcd_lock");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "etcd_lock_worker_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "etcd_lock lease worker");
	snprintf(worker.bgw_type, BGW_MAXLEN, "etcd_lock lease worker");
	RegisterBackgroundWorker(&worker);
}

/* A lease is lost: etcd said it is gone, or it expired unrenewed. */
static void
report_lost(int64 lease_id, int nlost, bool gone)
{
	if (gone)
		ereport(LOG,
				(errmsg_plural("etcd lease %llx is gone from etcd, so %d lock on it is lost",
							   "etcd lease %llx is gone from etcd, so %d locks on it are lost",
							   nlost, (unsigned long long) lease_id, nlost)));
	else
		ereport(LOG,
				(errmsg_plural("etcd lease %llx could not be renewed before it expired, so %d lock on it is lost",
							   "etcd lease %llx could not be renewed before it expired, so %d locks on it are lost",
							   nlost, (unsigned long long) lease_id, nlost)));
}

/* Whether attempt a is a request in flight for this lease. */
static inline bool
attempt_on(const Attempt *a, int slot, int64 lease_id)
{
	return a->in_use && a->kind != ATTEMPT_AUTH &&
		a->slot == slot && a->lease_id == lease_id;
}

/* Attempts in flight for this lease. */
static int
in_flight_for(int slot, int64 lease_id)
{
	int			n = 0;
	int			i;

	for (i = 0; i < MAX_IN_FLIGHT; i++)
		n += attempt_on(&attempts[i], slot, lease_id);
	return n;
}

/* When the next attempt for this lease may start. */
static TimestampTz
next_attempt(int slot, int64 lease_id)
{
	if (slot_lease[slot] != lease_id)
	{
		slot_lease[slot] = lease_id;
		slot_next_attempt[slot] = 0;
	}
	return slot_next_attempt[slot];
}

/* The member for a new attempt on a lease: the best one not busy with it. */
static int
pick_endpoint(int slot, int64 lease_id)
{
	int		   *order = palloc(sizeof(int) * etcd_endpoint_count());
	int			n = etcd_endpoint_order(order);
	int			i;

	for (i = 0; i < n; i++)
	{
		bool		busy = false;
		int			j;

		for (j = 0; j < MAX_IN_FLIGHT; j++)
			busy |= attempt_on(&attempts[j], slot, lease_id) &&
				attempts[j].endpoint == order[i];
		if (!busy)
			return order[i];
	}
	return order[0];
}

static Attempt *
free_attempt(void)
{
	int			i;

	for (i = 0; i < MAX_IN_FLIGHT; i++)
	{
		if (!attempts[i].in_use)
		{
			if (attempts[i].transfer == NULL)
				attempts[i].transfer = etcd_transfer_create();
			return &attempts[i];
		}
	}
	return NULL;
}

static void
start_attempt(Attempt *a, AttemptKind kind, int slot, int64 lease_id,
			  int endpoint, long timeout_ms)
{
	char	   *body;
	size_t		len;

	if (kind == ATTEMPT_AUTH)
	{
		EtcdResult	res;

		body = etcd_auth_body(&res, &len);
		if (body == NULL)
		{
			/* the password file could not be read: try again later */
			etcd_report(password_reported == etcd_auth_generation() ? DEBUG1 : LOG,
						attempt_paths[kind], &res);
			password_reported = etcd_auth_generation();
			auth_retry_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
														REVOKE_RETRY_MS);
			return;
		}
	}
	else
	{
		cJSON	   *req = cJSON_CreateObject();

		etcd_json_add_int64(req, "ID", lease_id);
		body = etcd_request_body(attempt_paths[kind], req, &len);
	}

	/* keepalives need no token; revokes do; authenticating sends none */
	etcd_transfer_begin(multi, a->transfer, endpoint, attempt_paths[kind], body, len,
						kind == ATTEMPT_REVOKE ? etcd_auth_token() : NULL,
						timeout_ms);
	if (kind == ATTEMPT_AUTH)
		memset(body, 0, len);	/* it holds the password */
	a->in_use = true;
	a->kind = kind;
	a->slot = slot;
	a->lease_id = lease_id;
	a->endpoint = endpoint;
	a->sent_at = GetCurrentTimestamp();
	a->cut_short = timeout_ms < etcd_lock_request_timeout;
	if (kind == ATTEMPT_AUTH)
		auth_in_flight = true;
	else if (kind == ATTEMPT_REVOKE)
		nrevokes++;
	etcd_stat_add(ETCD_STAT_REQUESTS, 1);
	if (kind == ATTEMPT_KEEPALIVE)
		etcd_stat_add(ETCD_STAT_KEEPALIVES, 1);
}

/*
 * Whether another member could do better than this answer.  Running out of
 * a budget shorter than request_timeout is not the member's fault.
 */
static bool
member_failed(Attempt *a, bool ok, EtcdResult *res)
{
	if (ok)
		return false;
	if (a->cut_short && res->timed_out)
		return false;
	return res->kind != ETCD_RES_ERROR || res->http_status >= 500;
}

static void
finish_attempt(Attempt *a)
{
	EtcdResult	res;
	bool		ok;
	TimestampTz now = GetCurrentTimestamp();

	ok = etcd_result_read(a->transfer, attempt_paths[a->kind], &res);
	res.endpoint = pstrdup(etcd_endpoint(a->endpoint));
	etcd_transfer_stop(multi, a->transfer);
	a->in_use = false;
	if (a->kind == ATTEMPT_AUTH)
		auth_in_flight = false;
	else if (a->kind == ATTEMPT_REVOKE)
		nrevokes--;
	if (!ok)
		etcd_stat_add(ETCD_STAT_FAILURES, 1);
	if (member_failed(a, ok, &res))
		etcd_endpoint_failed(a->endpoint);
	else if (!res.timed_out)
		etcd_endpoint_ok(a->endpoint);	/* it answered */

	switch (a->kind)
	{
		case ATTEMPT_AUTH:
			if (!etcd_auth_accept(ok, &res))
			{
				etcd_report(LOG, "/v3/auth/authenticate", &res);
				auth_retry_at = TimestampTzPlusMilliseconds(now, REVOKE_RETRY_MS);
			}
			break;

		case ATTEMPT_KEEPALIVE:
			{
				cJSON	   *result = ok ? cJSON_GetObjectItemCaseSensitive(res.json, "result") : NULL;
				int64		ttl = 0;

				/*
				 * Only etcd's own answer can say a lease is gone: a result with
				 * a header and no TTL.  Anything else is a failed attempt.
				 */
				if (ok && (!cJSON_IsObject(result) ||
						   !cJSON_IsObject(cJSON_GetObjectItemCaseSensitive(result, "header")) ||
						   !etcd_json_get_int64(result, "TTL", &ttl) || ttl < 0))
				{
					ok = false;
					etcd_stat_add(ETCD_STAT_FAILURES, 1);
					etcd_endpoint_failed(a->endpoint);
					res.error = pstrdup("The keepalive answer has no valid result.");
				}
				if (ok && ttl > 0)
					etcd_lease_renewed(a->slot, a->lease_id, a->sent_at,
									   (int) Min(ttl, ETCD_LOCK_MAX_TTL));
				else if (ok)
				{
					int			nlost = etcd_lease_declare_lost(a->slot, a->lease_id, true);

					if (nlost >= 0)
						report_lost(a->lease_id, nlost, true);
				}
				else
				{
					/* the next attempt may go out at once, elsewhere */
					(void) next_attempt(a->slot, a->lease_id);
					slot_next_attempt[a->slot] = TimestampTzPlusMilliseconds(now, RETRY_MS);
					elog(DEBUG1, "keepalive of etcd lease %llx at %s failed: %s",
						 (unsigned long long) a->lease_id, etcd_endpoint(a->endpoint),
						 res.error);
				}
				break;
			}

		case ATTEMPT_REVOKE:
			if (ok || (res.kind == ETCD_RES_ERROR && res.grpc_code == 5))
				etcd_lease_slot_revoked(a->slot, a->lease_id);	/* or already gone */
			else
			{
				if (res.kind == ETCD_RES_ERROR && res.http_status == 401)
					etcd_auth_reset();	/* expired token: authenticate again */
				elog(DEBUG1, "revoke of etcd lease %llx at %s failed: %s",
					 (unsigned long long) a->lease_id, etcd_endpoint(a->endpoint),
					 res.error);
				etcd_lease_revoke_failed(a->slot, a->lease_id,
										 TimestampTzPlusMilliseconds(now, REVOKE_RETRY_MS));
			}
			break;
	}
}

/*
 * Keep one lease alive: start an attempt when one is due, or hedge a slow
 * one.  Returns when to look at it again.
 */
static TimestampTz
renew_lease(EtcdLeaseView *v, TimestampTz now)
{
	long		left = TimestampDifferenceMilliseconds(now, v->expires_at);
	long		timeout = Min((long) etcd_lock_request_timeout, left);
	int			busy = in_flight_for(v->slot, v->lease_id);
	TimestampTz next = next_attempt(v->slot, v->lease_id);
	Attempt    *a;

	if (now >= v->expires_at || left < MIN_ATTEMPT_MS)
	{
		/* no attempt can succeed any more; wait for those in flight */
		if (busy == 0)
		{
			int			nlost = etcd_lease_declare_lost(v->slot, v->lease_id, false);

			if (nlost >= 0)
				report_lost(v->lease_id, nlost, false);
			return TimestampTzPlusMilliseconds(now, RETRY_MS);
		}
		/* their answers, or curl's timers, wake the loop */
		return TimestampTzPlusMilliseconds(now, etcd_lock_request_timeout);
	}
	if (v->next_due > now)
		return Min(v->next_due, v->expires_at);
	if (busy >= MAX_ATTEMPTS)
		return v->expires_at;	/* an answer or a timeout wakes the loop */
	if (now < next)
		return Min(next, v->expires_at);
	if ((a = free_attempt()) == NULL)
		return TimestampTzPlusMilliseconds(now, 10);

	/* the member still sitting on the last attempt is slow: try it last */
	if (busy > 0)
	{
		int			i;

		for (i = 0; i < MAX_IN_FLIGHT; i++)
			if (attempt_on(&attempts[i], v->slot, v->lease_id))
				etcd_endpoint_failed(attempts[i].endpoint);
	}
	start_attempt(a, ATTEMPT_KEEPALIVE, v->slot, v->lease_id,
				  pick_endpoint(v->slot, v->lease_id), timeout);
	next = TimestampTzPlusMilliseconds(now, Max(RETRY_MS, timeout / 3));
	slot_next_attempt[v->slot] = next;
	return Min(next, v->expires_at);
}

/* Revoke a lease given up or lost.  Returns when to look at it again. */
static TimestampTz
revoke_lease(EtcdLeaseView *v, TimestampTz now)
{
	TimestampTz retry = TimestampTzPlusMilliseconds(now, REVOKE_RETRY_MS);
	Attempt    *a;

	if (v->next_due > now)
		return v->next_due;
	if (in_flight_for(v->slot, v->lease_id) > 0)
		return retry;

	/* revokes need a token when auth is on; keepalives go on meanwhile */
	if (etcd_auth_wanted())
	{
		if (!auth_in_flight && now >= auth_retry_at && (a = free_attempt()) != NULL)
			start_attempt(a, ATTEMPT_AUTH, -1, 0, pick_endpoint(-1, 0),
						  etcd_lock_request_timeout);
		/* gives the slot up once etcd has surely expired the lease */
		etcd_lease_revoke_failed(v->slot, v->lease_id, retry);
		return retry;
	}
	if (nrevokes >= MAX_REVOKES || (a = free_attempt()) == NULL)
		return TimestampTzPlusMilliseconds(now, 10);
	start_attempt(a, ATTEMPT_REVOKE, v->slot, v->lease_id, pick_endpoint(v->slot, v->lease_id),
				  etcd_lock_request_timeout);
	/* the answer decides what comes next; look again if it never does */
	retry = TimestampTzPlusMilliseconds(now, (int64) etcd_lock_request_timeout + REVOKE_RETRY_MS);
	etcd_lease_slot_defer(v->slot, v->lease_id, retry);
	return retry;
}

/* One pass over the lease table; returns ms until the next is needed. */
static long
work(void)
{
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz next = TimestampTzPlusMilliseconds(now, 10000);
	int			n = etcd_lease_table_snapshot(views);
	int			i;

	for (i = 0; i < n; i++)
	{
		EtcdLeaseView *v = &views[i];
		TimestampTz when;

		if (v->state == ETCD_LEASE_RENEWING)
			when = renew_lease(v, now);
		else
			when = revoke_lease(v, now);
		if (when < next)
			next = when;
	}
	return Max(0, TimestampDifferenceMilliseconds(GetCurrentTimestamp(), next));
}

/* New TLS files: drop the pool made with the old ones; retry at once. */
static void
renew_pool(void)
{
	int			i;

	for (i = 0; i < MAX_IN_FLIGHT; i++)
	{
		if (!attempts[i].in_use)
			continue;
		etcd_transfer_stop(multi, attempts[i].transfer);
		attempts[i].in_use = false;
		if (attempts[i].kind != ATTEMPT_AUTH)
			slot_next_attempt[attempts[i].slot] = 0;
	}
	nrevokes = 0;
	auth_in_flight = false;
	etcd_multi_destroy(multi);
	multi = etcd_multi_create();
	tls_generation = etcd_tls_generation();
}

static void
worker_exit(int code, Datum arg)
{
	etcd_worker_detach();
}

void
etcd_lock_worker_main(Datum arg)
{
	MemoryContext loop_cxt;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnection(NULL, NULL, 0);

	multi = etcd_multi_create();
	slot_lease = MemoryContextAllocZero(TopMemoryContext,
										sizeof(int64) * etcd_lock_max_locks);
	slot_next_attempt = MemoryContextAllocZero(TopMemoryContext,
											   sizeof(TimestampTz) * etcd_lock_max_locks);
	views = MemoryContextAlloc(TopMemoryContext,
							   sizeof(EtcdLeaseView) * etcd_lock_max_locks);
	loop_cxt = AllocSetContextCreate(TopMemoryContext, "etcd_lock worker",
									 ALLOCSET_DEFAULT_SIZES);

	etcd_worker_attach();
	before_shmem_exit(worker_exit, (Datum) 0);

	for (;;)
	{
		long		wait_ms;
		int			i;

		MemoryContextReset(loop_cxt);
		MemoryContextSwitchTo(loop_cxt);

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		if (tls_generation != etcd_tls_generation())
			renew_pool();

		for (i = 0; i < MAX_IN_FLIGHT; i++)
			if (attempts[i].in_use && etcd_transfer_done(attempts[i].transfer))
				finish_attempt(&attempts[i]);

		wait_ms = work();
		etcd_multi_wait(multi, wait_ms, ETCD_WAIT_WORKER);
	}
}
