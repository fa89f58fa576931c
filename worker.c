/*-------------------------------------------------------------------------
 *
 * worker.c
 *		  The lease worker: keeps alive every lease that backends registered
 *		  in shared memory, and marks lost the ones etcd no longer has.
 *
 * Keepalives run in parallel on one curl multi handle, each bounded by
 * etcd_lock.request_timeout, so one slow or hanging request never holds up
 * the others.  The worker also finishes the revokes that backends could not
 * get through to etcd.
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

#include "etcd_lock.h"

/* keepalives in flight at once; the rest wait for a free place */
#define MAX_IN_FLIGHT	32

/* The worker's view of one lease slot. */
typedef struct KeepaliveState
{
	int64		lease_id;		/* lease of the request in flight */
	EtcdTransfer *transfer;		/* created on first use, then reused */
	bool		in_flight;
	bool		revoking;		/* the request is a revoke, not a keepalive */
	TimestampTz sent_at;		/* when the request went out */
} KeepaliveState;

static KeepaliveState *ka;
static EtcdMulti *multi;
static int	preferred = 0;
static int	in_flight = 0;
static int	tls_generation = 0;	/* of the TLS files multi's pool was made with */

void
etcd_worker_register(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS;
	worker.bgw_start_time = BgWorkerStart_PostmasterStart;
	worker.bgw_restart_time = 1;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "etcd_lock");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "etcd_lock_worker_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "etcd_lock lease worker");
	snprintf(worker.bgw_type, BGW_MAXLEN, "etcd_lock lease worker");
	RegisterBackgroundWorker(&worker);
}

/*
 * The lease is gone, or may be: stop renewing it, count and log its locks,
 * and wake its backend.  Caller holds the LWLock exclusively; the rest is
 * done by the caller once it is released.
 */
static Latch *
mark_lost(EtcdLeaseSlot *s, int *nlost)
{
	s->lost = true;
	*nlost = etcd_locks_on_lease(s->lease_id);
	return s->owner_latch;
}

static void
report_lost(int64 lease_id, int nlost, Latch *owner, const char *why)
{
	etcd_stat_add(lost, nlost);
	ereport(LOG,
			(errmsg("etcd_lock: lease %llx %s; %d lock(s) on it are lost",
					(unsigned long long) lease_id, why, nlost)));
	if (owner)
		SetLatch(owner);
}

static void
finish_keepalive(int i)
{
	KeepaliveState *k = &ka[i];
	EtcdLeaseSlot *s = &etcd_shared->leases[i];
	EtcdResult	res;
	bool		ok;
	int64		ttl = 0;
	int			nlost = 0;
	Latch	   *owner = NULL;
	bool		gone = false;
	TimestampTz now = GetCurrentTimestamp();

	ok = etcd_transfer_result(k->transfer, &res);
	etcd_transfer_stop(multi, k->transfer);
	k->in_flight = false;
	in_flight--;
	if (ok && !k->revoking)
	{
		cJSON	   *result = cJSON_GetObjectItemCaseSensitive(res.json, "result");

		/*
		 * Only etcd's own answer can say a lease is gone: a result with a
		 * header and no TTL.  Anything else is a failed keepalive, retried.
		 */
		if (!cJSON_IsObject(result) ||
			!cJSON_IsObject(cJSON_GetObjectItemCaseSensitive(result, "header")))
		{
			ok = false;
			res.kind = ETCD_RES_PROTOCOL;
			res.error = pstrdup("keepalive answer without a result header");
		}
		else
			ttl = etcd_json_int64(result, "TTL");
	}
	if (!ok)
	{
		etcd_stat_add(failures, 1);
		if (res.http_status == 401)
			etcd_auth_reset();	/* expired token: authenticate again */
		/* the next request goes to the next member */
		preferred = (preferred + 1) % etcd_endpoint_count();
		elog(DEBUG1, "etcd_lock: keepalive of lease %llx failed: %s",
			 (unsigned long long) k->lease_id, res.error);
	}

	LWLockAcquire(etcd_shared->lock, LW_EXCLUSIVE);
	if (s->lease_id == k->lease_id && s->revoke && !k->revoking)
	{
		/* a keepalive that raced its lease's revoke: not a loss */
	}
	else if (s->lease_id == k->lease_id && k->revoking)
	{
		/* done when revoked, already gone, or surely expired by now */
		if (ok || (res.kind == ETCD_RES_ERROR && res.grpc_code == 5) ||
			now >= s->revoke_until)
			s->lease_id = 0;
		else
			s->next_keepalive = TimestampTzPlusMilliseconds(now, 500);
	}
	else if (s->lease_id == k->lease_id)
	{
		if (ok && ttl > 0)
		{
			/* etcd restarted the TTL no earlier than when we asked */
			s->last_renewed = k->sent_at;
			s->next_keepalive = TimestampTzPlusMilliseconds(now, ttl * 1000 / 3);
		}
		else if (ok)
		{
			/* a keepalive answered without a TTL: etcd has no such lease */
			owner = mark_lost(s, &nlost);
			gone = true;
		}
		else
		{
			/* retry soon, well before the lease could expire */
			s->next_keepalive = TimestampTzPlusMilliseconds(now,
															Min(1000, Max(100, s->ttl * 1000 / 6)));
		}
	}
	LWLockRelease(etcd_shared->lock);

	if (gone)
		report_lost(k->lease_id, nlost, owner, "is gone from etcd");
}

/* Start the keepalives that are due; return ms until the next one is. */
static long
start_due_keepalives(void)
{
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz next = TimestampTzPlusMilliseconds(now, 10000);
	int			due[MAX_IN_FLIGHT];
	int64		ids[MAX_IN_FLIGHT];
	bool		revoke[MAX_IN_FLIGHT];
	int			ndue = 0;
	bool		expired = false;
	int			i;

	LWLockAcquire(etcd_shared->lock, LW_SHARED);
	for (i = 0; i < etcd_lock_max_locks; i++)
	{
		EtcdLeaseSlot *s = &etcd_shared->leases[i];
		TimestampTz expiry;

		if (s->lease_id <= 0 || s->lost)
			continue;
		/*
		 * Unrenewed for a whole TTL (less a margin): etcd may have let the
		 * lease go, and another client may hold our locks.  Say so, rather
		 * than let a partition keep them "held" here.
		 */
		expiry = TimestampTzPlusMilliseconds(s->last_renewed,
											 s->ttl * 1000L - Min(500, s->ttl * 100L));
		if (!s->revoke && now >= expiry)
		{
			expired = true;
			continue;
		}
		if (!s->revoke && expiry < next)
			next = expiry;
		if (ka[i].in_flight)
			continue;
		if (s->next_keepalive <= now && in_flight + ndue < MAX_IN_FLIGHT)
		{
			due[ndue] = i;
			revoke[ndue] = s->revoke;
			ids[ndue++] = s->lease_id;
		}
		else if (s->next_keepalive < next)
			next = s->next_keepalive;
	}
	LWLockRelease(etcd_shared->lock);

	if (expired)
	{
		for (i = 0; i < etcd_lock_max_locks; i++)
		{
			EtcdLeaseSlot *s = &etcd_shared->leases[i];
			int64		id;
			int			nlost = 0;
			Latch	   *owner = NULL;

			LWLockAcquire(etcd_shared->lock, LW_EXCLUSIVE);
			id = s->lease_id;
			if (id > 0 && !s->lost && !s->revoke &&
				now >= TimestampTzPlusMilliseconds(s->last_renewed,
												   s->ttl * 1000L - Min(500, s->ttl * 100L)))
				owner = mark_lost(s, &nlost);
			else
				id = 0;
			LWLockRelease(etcd_shared->lock);
			if (id > 0)
				report_lost(id, nlost, owner, "could not be renewed within its TTL");
		}
	}

	if (ndue > 0)
		etcd_auth_ensure();
	for (i = 0; i < ndue; i++)
	{
		KeepaliveState *k = &ka[due[i]];
		char		body[64];
		char	   *url;

		if (k->transfer == NULL)
			k->transfer = etcd_transfer_create();
		snprintf(body, sizeof(body), "{\"ID\":\"" INT64_FORMAT "\"}", ids[i]);
		url = psprintf("%s/v3/lease/%s", etcd_endpoint(preferred),
					   revoke[i] ? "revoke" : "keepalive");
		etcd_transfer_start(multi, k->transfer, url, body, etcd_lock_request_timeout);
		k->lease_id = ids[i];
		k->in_flight = true;
		k->revoking = revoke[i];
		k->sent_at = GetCurrentTimestamp();
		in_flight++;
		etcd_stat_add(requests, 1);
		if (!revoke[i])
			etcd_stat_add(keepalives, 1);
	}

	/* at the cap, look again as soon as a place frees up */
	if (in_flight >= MAX_IN_FLIGHT)
		return 10;
	return Max(0, TimestampDifferenceMilliseconds(now, next));
}

static void
worker_exit(int code, Datum arg)
{
	LWLockAcquire(etcd_shared->lock, LW_EXCLUSIVE);
	etcd_shared->worker_latch = NULL;
	etcd_shared->worker_pid = 0;
	LWLockRelease(etcd_shared->lock);
}

void
etcd_lock_worker_main(Datum arg)
{
	MemoryContext loop_cxt;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	multi = etcd_multi_create();
	ka = MemoryContextAllocZero(TopMemoryContext,
								sizeof(KeepaliveState) * etcd_lock_max_locks);
	loop_cxt = AllocSetContextCreate(TopMemoryContext, "etcd_lock worker",
									 ALLOCSET_DEFAULT_SIZES);

	LWLockAcquire(etcd_shared->lock, LW_EXCLUSIVE);
	etcd_shared->worker_latch = MyLatch;
	etcd_shared->worker_pid = MyProcPid;
	LWLockRelease(etcd_shared->lock);
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

		/* new TLS files: drop the pool made with the old ones */
		if (tls_generation != etcd_tls_generation())
		{
			for (i = 0; i < etcd_lock_max_locks; i++)
			{
				if (!ka[i].in_flight)
					continue;
				etcd_transfer_stop(multi, ka[i].transfer);
				ka[i].in_flight = false;
				in_flight--;
				/* retried at once, on the new pool */
				LWLockAcquire(etcd_shared->lock, LW_EXCLUSIVE);
				if (etcd_shared->leases[i].lease_id == ka[i].lease_id)
					etcd_shared->leases[i].next_keepalive = GetCurrentTimestamp();
				LWLockRelease(etcd_shared->lock);
			}
			etcd_multi_destroy(multi);
			multi = etcd_multi_create();
			tls_generation = etcd_tls_generation();
		}

		for (i = 0; i < etcd_lock_max_locks; i++)
			if (ka[i].in_flight && etcd_transfer_done(ka[i].transfer))
				finish_keepalive(i);

		wait_ms = start_due_keepalives();
		etcd_multi_wait(multi, wait_ms);
	}
}
