/*-------------------------------------------------------------------------
 *
 * locks.c
 *		  This backend's etcd leases and locks: acquiring and releasing
 *		  them, the transaction and savepoint callbacks, and session end.
 *
 * A lock on NAME is a key NAME/<lease id in hex> attached to a lease.  The
 * key with the smallest create_revision under NAME/ owns the lock; every
 * other waiter watches the key just before its own, so waiters are served
 * in FIFO order and a release wakes exactly one of them.
 *
 * The life of a local lock:
 *
 *	(none) --enqueue--> waiting --owned--> held --last hold released-->
 *	    pending release --etcd deleted it, or its lease is gone--> (none)
 *
 * and, from waiting or held, "lost" once its lease is lost (the shared slot
 * says so, see shmem.c) or its key is gone.  A lost lock stays in the table
 * until the session lets go of it, so that it is reported, never re-entered.
 *
 * Everything run by the COMMIT, ABORT, savepoint-abort and exit callbacks
 * first forgets locally, without any request and without allocating (the
 * pending list is sized in advance), and only then talks to etcd, under one
 * deadline, with every failure demoted to a WARNING.  Whatever could not be
 * released is handed to the lease worker (by giving up the lease) or, when
 * the lease still carries held locks, retried at the session's next call.
 *
 * IDENTIFICATION
 *		  locks.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "access/xlog.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/proc.h"
#include "utils/elog.h"
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"
#include "utils/timeout.h"
#include "utils/timestamp.h"

#include "client.h"
#include "locks.h"
#include "recipe.h"
#include "shmem.h"

/*
 * SQLSTATE for "a lock this session held or waited for is gone in etcd".
 * Class 40 (transaction rollback), so that drivers and frameworks treat it
 * as a retryable concurrency failure.
 */
#define ERRCODE_ETCD_LOCK_LOST	MAKE_SQLSTATE('4','0','L','0','1')

/* settings (GUCs) */
static char *lock_prefix = NULL;
static bool commit_check_on = true;

/*
 * One lease per TTL in use.  A lease outlives its last lock, so that the next
 * lock costs no grant, until the worker takes it back after a while idle.
 */
typedef struct LocalLease
{
	int64		id;				/* 0: free entry */
	int			ttl;			/* TTL asked for */
	int			slot;			/* in the shared lease table */
	int			nusers;			/* locks and pending releases on it */
	bool		lost;
} LocalLease;

/* Transaction holds taken in one (sub)transaction. */
typedef struct XactHold
{
	SubTransactionId subid;
	int			count;
} XactHold;

#define MAX_XACT_HOLDS	32

typedef struct LocalLock
{
	char		etcd_name[ETCD_LOCK_KEY_MAX];	/* hash key: prefix + name */
	char		name[ETCD_LOCK_NAME_MAX];
	char		handle[ETCD_LOCK_KEY_MAX];
	int			lease;			/* index into leases[] */
	int64		revision;		/* create_revision: the fencing token */
	int			session_count;
	int			xact_count;		/* sum of holds[].count */
	int			nholds;
	XactHold	holds[MAX_XACT_HOLDS];
	int			slot;			/* in the shared lock table */
	bool		lost;
} LocalLock;

/* A key we no longer want, not deleted yet. */
typedef struct PendingRelease
{
	char		handle[ETCD_LOCK_KEY_MAX];
	int64		revision;		/* 0: a waiter key, revision unknown */
	int			lease;
} PendingRelease;

static LocalLease *leases = NULL;
static int	nleases = 0;
static HTAB *local_locks = NULL;
static int	xact_locks = 0;		/* locks with xact_count > 0 */
static PendingRelease *pending = NULL;
static int	npending = 0;
static int	npending_max = 0;

/* Transaction-end and exit work allocates here, and resets it. */
static MemoryContext callback_cxt = NULL;

static void etcd_lock_exit(int code, Datum arg);
static void etcd_lock_xact_callback(XactEvent event, void *arg);
static void etcd_lock_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
									   SubTransactionId parentSubid, void *arg);
static void lease_users(int i, int delta);
static void lease_found_lost(int i);
static void lease_unuse(int i);
static void lease_forget(int i);
static bool revoke_given_up(int slot, int64 id, int elevel);
static void lease_drop(int i);
static int	lease_for_ttl(int ttl);
static void lock_forget(LocalLock *lock);
static void queue_release(LocalLock *lock);
static EtcdReleaseStatus flush_one(int i, int elevel);
static void flush_pending(int elevel);
static void hand_pending_to_worker(void);
static void cleanup_releases(void);
static void pending_reserve(int n);
static void raise_if_doomed(void);
static void abandon_wait(int lease_i, const char *mykey);
static void add_hold(LocalLock *lock, bool xact);
static EtcdRecipeStatus enqueue_and_wait(const char *etcd_name, const char *name,
										 int lease_i, const char *handle,
										 long wait_ms, int64 *myrev);
static LocalLock *lock_by_handle(const char *handle);
static char *handle_for_message(const char *handle);
static void commit_check(void);
static void release_xact_locks(void);
static void check_lost(void);

/*
 * How long the worker leaves a lease alone that a backend is revoking
 * itself, before it steps in.
 */
static long
backend_grace_ms(void)
{
	return 2L * etcd_lock_request_timeout + 1000;
}

static void
local_init(void)
{
	HASHCTL		ctl;

	if (local_locks != NULL)
		return;
	ctl.keysize = ETCD_LOCK_KEY_MAX;
	ctl.entrysize = sizeof(LocalLock);
	local_locks = hash_create("etcd_lock local locks", 64, &ctl,
							  HASH_ELEM | HASH_STRINGS);
	nleases = 4;
	leases = MemoryContextAllocZero(TopMemoryContext, sizeof(LocalLease) * nleases);
	npending_max = 8;
	pending = MemoryContextAllocZero(TopMemoryContext,
									 sizeof(PendingRelease) * npending_max);
	callback_cxt = AllocSetContextCreate(TopMemoryContext, "etcd_lock callbacks",
										 ALLOCSET_SMALL_SIZES);
	before_shmem_exit(etcd_lock_exit, (Datum) 0);
	RegisterXactCallback(etcd_lock_xact_callback, NULL);
	RegisterSubXactCallback(etcd_lock_subxact_callback, NULL);
}

/* ----------------------------------------------------------------
 * Leases
 * ----------------------------------------------------------------
 */

/* Count a lock or pending release on a lease, here and in shared memory. */
static void
lease_users(int i, int delta)
{
	leases[i].nusers += delta;
	Assert(leases[i].nusers >= 0);
	etcd_lease_slot_set_users(leases[i].slot, leases[i].id, leases[i].nusers);
}

/* One lock or pending release less on a lease; a lost lease goes when unused. */
static void
lease_unuse(int i)
{
	lease_users(i, -1);
	if (leases[i].lost && leases[i].nusers == 0)
		lease_forget(i);
}

/* Stop using a lease: the worker revokes it unless etcd dropped it already. */
static void
lease_forget(int i)
{
	etcd_lease_slot_give_up(leases[i].slot, leases[i].id, 0);
	leases[i].id = 0;
}

/*
 * Revoke a lease given up (REVOKING: the worker leaves it to us for
 * backend_grace_ms).  On success its slot is freed.  If etcd does not
 * answer, or the request raises an ERROR (elevel ERROR), the worker takes
 * the revoke over at once: a request that timed out may still be applied
 * when etcd recovers, and its keys must not stay until the lease expires.
 */
static bool
revoke_given_up(int slot, int64 id, int elevel)
{
	bool		ok;

	PG_TRY();
	{
		ok = etcd_lease_revoke(id, elevel);
	}
	PG_CATCH();
	{
		etcd_lease_slot_give_up(slot, id, 0);
		PG_RE_THROW();
	}
	PG_END_TRY();
	if (ok)
		etcd_lease_slot_revoked(slot, id);
	else
		etcd_lease_slot_give_up(slot, id, 0);
	return ok;
}

/*
 * Revoke a lease we no longer need, and forget it.  Renewal stops first: a
 * keepalive racing the revoke would report a loss.
 */
static void
lease_drop(int i)
{
	int64		id = leases[i].id;
	int			slot = leases[i].slot;

	leases[i].id = 0;
	leases[i].nusers = 0;
	etcd_lease_slot_give_up(slot, id, backend_grace_ms());
	revoke_given_up(slot, id, WARNING);
}

/*
 * A free lease slot, taking back the longest-idle lease of any session when
 * the table is full.  Raises 53200 when every lease carries a lock.
 */
static int
reserve_lease_slot(void)
{
	for (;;)
	{
		int			slot = etcd_lease_slot_reserve();
		int64		victim;
		int			vslot;

		if (slot >= 0)
			return slot;
		vslot = etcd_lease_slot_steal_idle(&victim, backend_grace_ms());
		if (vslot < 0)
			ereport(ERROR,
					(errcode(ERRCODE_OUT_OF_MEMORY),
					 errmsg("too many etcd leases in use on this server"),
					 errdetail("Each of the %d lease slots carries a lock.",
							   etcd_lock_max_locks),
					 errhint("Increase etcd_lock.max_locks.")));
		revoke_given_up(vslot, victim, ERROR);
	}
}

/* This backend's lease for ttl, granted now if there is none; pinned. */
static int
lease_for_ttl(int ttl)
{
	int			i;
	int			free_i = -1;
	int			slot;
	int			granted;
	int64		id;
	TimestampTz sent_at;

	for (i = 0; i < nleases; i++)
	{
		if (leases[i].id != 0 && leases[i].ttl == ttl && !leases[i].lost)
		{
			/* pinning fails when the lease was taken back or lost */
			leases[i].nusers++;
			if (etcd_lease_slot_set_users(leases[i].slot, leases[i].id,
										  leases[i].nusers))
				return i;
			leases[i].nusers--;
			if (leases[i].nusers == 0 &&
				etcd_lease_slot_check(leases[i].slot, leases[i].id) == ETCD_LEASE_FREE)
				leases[i].id = 0;	/* given back while idle */
			else
			{
				lease_found_lost(i);
				raise_if_doomed();
			}
		}
		if (leases[i].id == 0 && free_i < 0)
			free_i = i;
	}
	if (free_i < 0)
	{
		leases = repalloc(leases, sizeof(LocalLease) * nleases * 2);
		memset(leases + nleases, 0, sizeof(LocalLease) * nleases);
		free_i = nleases;
		nleases *= 2;
	}

	/* take the shared slot first, so a full table costs no etcd request */
	slot = reserve_lease_slot();
	sent_at = GetCurrentTimestamp();
	PG_TRY();
	{
		id = etcd_lease_grant(ttl, &granted);
	}
	PG_CATCH();
	{
		etcd_lease_slot_cancel(slot);
		PG_RE_THROW();
	}
	PG_END_TRY();
	etcd_lease_slot_fill(slot, id, granted, sent_at);

	leases[free_i].id = id;
	leases[free_i].ttl = ttl;
	leases[free_i].slot = slot;
	leases[free_i].nusers = 1;	/* fill pinned it for us */
	leases[free_i].lost = false;
	return free_i;
}

/* ----------------------------------------------------------------
 * Releases
 * ----------------------------------------------------------------
 */

/* Room for n more pending releases, made before anything may not allocate. */
static void
pending_reserve(int n)
{
	if (npending + n <= npending_max)
		return;
	pending = repalloc(pending, sizeof(PendingRelease) * (npending + n) * 2);
	npending_max = (npending + n) * 2;
}

/* Drop a lock from local and shared state, and its use of the lease. */
static void
lock_forget(LocalLock *lock)
{
	int			lease_i = lock->lease;

	etcd_lock_slot_remove(lock->slot);
	if (lock->xact_count > 0)
		xact_locks--;
	hash_search(local_locks, lock->etcd_name, HASH_REMOVE, NULL);
	lease_unuse(lease_i);
}

/*
 * Forget a lock whose last hold is released, and queue its key for
 * deletion.  No request and no allocation: callbacks call this first.
 */
static void
queue_release(LocalLock *lock)
{
	int			lease_i = lock->lease;

	/*
	 * A lost lock was reported when found lost, and the worker revokes its
	 * lease, and the key.  The pending list cannot be full (room is made when
	 * a lock is taken); if it were, the key would go with the lease at
	 * session end.
	 */
	if (lock->lost || leases[lease_i].lost || npending >= npending_max)
	{
		lock_forget(lock);
		return;
	}
	strlcpy(pending[npending].handle, lock->handle, sizeof(pending[npending].handle));
	pending[npending].revision = lock->revision;
	pending[npending].lease = lease_i;
	npending++;
	leases[lease_i].nusers++;	/* the pending release keeps the lease */
	etcd_stat_add(ETCD_STAT_RELEASED, 1);
	lock_forget(lock);
}

/* Drop pending[i], the key being deleted or gone with its lease. */
static void
pending_done(int i)
{
	int			lease_i = pending[i].lease;

	pending[i] = pending[--npending];
	lease_unuse(lease_i);
}

/*
 * Delete the key of pending[i] and drop it, unless etcd could not be
 * reached: then it stays.  A failure is reported at elevel.
 */
static EtcdReleaseStatus
flush_one(int i, int elevel)
{
	PendingRelease *p = &pending[i];
	EtcdReleaseStatus r;

	if (leases[p->lease].lost)
		r = ETCD_RELEASE_DELETED;	/* its lease is revoked, with the key */
	else if (p->revision != 0)
		r = etcd_recipe_release(p->handle, p->revision, elevel);

	/*
	 * A waiter key's revision may be unknown (its enqueue was cut off):
	 * delete it unguarded, which is safe because the key's name carries our
	 * lease, so only we ever create it.
	 */
	else
		r = etcd_key_delete(p->handle, elevel) ? ETCD_RELEASE_DELETED :
			ETCD_RELEASE_FAILED;
	if (r != ETCD_RELEASE_FAILED)
		pending_done(i);
	return r;
}

/* Retry every pending release; stop at the first that etcd does not take. */
static void
flush_pending(int elevel)
{
	while (npending > 0)
	{
		if (flush_one(npending - 1, elevel) == ETCD_RELEASE_FAILED)
			return;
	}
}

/*
 * etcd could not be reached for some pending releases.  Where nothing else
 * rides on their lease, give the lease up: the worker revokes it, which
 * deletes the keys, even if this session never calls again.  The others are
 * retried at the next call, or when the session ends.  Never throws.
 */
static void
hand_pending_to_worker(void)
{
	int			i;

	for (i = 0; i < nleases; i++)
	{
		int			npend = 0;
		int			j;

		if (leases[i].id == 0)
			continue;
		for (j = 0; j < npending; j++)
			npend += pending[j].lease == i;
		if (npend == 0 || npend != leases[i].nusers)
			continue;
		for (j = npending - 1; j >= 0; j--)
			if (pending[j].lease == i)
				pending[j] = pending[--npending];
		leases[i].nusers = 0;
		lease_forget(i);
	}
}

/*
 * The release work of a callback: the locks are forgotten already, so only
 * requests are left.  One deadline bounds them all, and every failure,
 * even an ERROR, ends as a WARNING.
 */
static void
cleanup_releases(void)
{
	MemoryContext cxt = CurrentMemoryContext;
	TimestampTz old;

	if (npending == 0)
		return;
	if (in_error_recursion_trouble())
	{
		hand_pending_to_worker();
		return;
	}
	old = etcd_set_deadline(TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
														etcd_lock_request_timeout));
	PG_TRY();
	{
		flush_pending(WARNING);
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		/* the error as it was, with its detail and context, as a WARNING */
		edata->elevel = WARNING;
		ThrowErrorData(edata);
		FreeErrorData(edata);
	}
	PG_END_TRY();
	etcd_set_deadline(old);
	if (npending > 0)
	{
		ereport(WARNING,
				(errmsg_plural("%d etcd lock key could not be deleted",
							   "%d etcd lock keys could not be deleted",
							   npending, npending),
				 errdetail("The lease worker revokes their leases, or they are deleted at this session's next call or end.")));
		hand_pending_to_worker();
	}
}

/* ----------------------------------------------------------------
 * Losses
 * ----------------------------------------------------------------
 */

/*
 * A transaction that holds a lost transaction lock is doomed: every call,
 * every statement and its COMMIT fail until it ends, even if the client
 * caught the first error.
 */
static void
raise_if_doomed(void)
{
	HASH_SEQ_STATUS seq;
	LocalLock  *lock;

	if (xact_locks == 0)
		return;
	hash_seq_init(&seq, local_locks);
	while ((lock = hash_seq_search(&seq)) != NULL)
	{
		if (lock->xact_count > 0 && lock->lost)
		{
			hash_seq_term(&seq);
			ereport(ERROR,
					(errcode(ERRCODE_ETCD_LOCK_LOST),
					 errmsg("etcd transaction lock \"%s\" was lost", lock->name),
					 errdetail("Its key \"%s\" is gone from etcd, or its lease could not be renewed in time.",
							   lock->handle),
					 errhint("The transaction cannot commit; retry it.")));
		}
	}
}

/*
 * Lease i is lost: so is every lock on it.  A lost session lock gets a
 * WARNING, once; a lost transaction lock dooms its transaction, which
 * raise_if_doomed() reports.
 */
static void
lease_found_lost(int i)
{
	HASH_SEQ_STATUS seq;
	LocalLock  *lock;

	leases[i].lost = true;
	hash_seq_init(&seq, local_locks);
	while ((lock = hash_seq_search(&seq)) != NULL)
	{
		if (lock->lost || lock->lease != i)
			continue;
		lock->lost = true;
		if (lock->xact_count > 0)
			continue;
		ereport(WARNING,
				(errcode(ERRCODE_ETCD_LOCK_LOST),
				 errmsg("etcd lock \"%s\" was lost", lock->name),
				 errdetail("Its lease %llx expired, was revoked, or could not be renewed in time, so etcd no longer keeps the key \"%s\".",
						   (unsigned long long) leases[i].id, lock->handle)));
	}
	if (leases[i].nusers == 0)
		lease_forget(i);
}

/* Look at the shared state of each lease; true if one was newly lost. */
static bool
note_lost_leases(void)
{
	bool		any = false;
	int			i;

	for (i = 0; i < nleases; i++)
	{
		EtcdLeaseState state;

		if (leases[i].id == 0 || leases[i].lost)
			continue;
		state = etcd_lease_slot_check(leases[i].slot, leases[i].id);
		if (state == ETCD_LEASE_FREE && leases[i].nusers == 0)
			leases[i].id = 0;	/* idle, and given back */
		else if (state != ETCD_LEASE_RENEWING)
		{
			lease_found_lost(i);
			any = true;
		}
	}
	return any;
}

/*
 * Report locks whose lease is lost.  Every entry point calls this, so a lost
 * lock is never lost silently: a lost session lock gets a WARNING once, and
 * a lost transaction lock dooms its transaction.  Also retries deferred
 * releases.
 */
static void
check_lost(void)
{
	if (local_locks == NULL)
		return;
	if (npending > 0)
		flush_pending(DEBUG1);
	note_lost_leases();
	raise_if_doomed();
}

/* Called before each statement: a transaction under a lost lock is doomed. */
void
etcd_lock_check_doomed(void)
{
	int			i;

	if (xact_locks == 0)
		return;
	for (i = 0; i < nleases; i++)
	{
		if (leases[i].id != 0 && !leases[i].lost &&
			etcd_lease_slot_check(leases[i].slot, leases[i].id) != ETCD_LEASE_RENEWING)
		{
			check_lost();
			return;
		}
	}
	raise_if_doomed();
}

/* ----------------------------------------------------------------
 * Acquiring
 * ----------------------------------------------------------------
 */

/*
 * Give up a wait: revoke the lease when nothing else uses it, so that no
 * lease is renewed for an abandoned wait (that deletes the waiter key too),
 * or else delete the waiter key.  Runs in error paths, with interrupts held
 * and one deadline for its requests.
 */
static void
abandon_wait(int lease_i, const char *mykey)
{
	LocalLease *lease = &leases[lease_i];
	TimestampTz old;

	old = etcd_set_deadline(TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
														etcd_lock_request_timeout));
	PG_TRY();
	{
		if (lease->nusers == 1 && !lease->lost)
			lease_drop(lease_i);
		else if (lease->lost)
			lease_unuse(lease_i);
		else
		{
			/* the lease stays for its locks: queue the key like a release */
			Assert(npending < npending_max);
			strlcpy(pending[npending].handle, mykey, sizeof(pending[npending].handle));
			pending[npending].revision = 0;
			pending[npending].lease = lease_i;
			npending++;
			flush_one(npending - 1, WARNING);
		}
	}
	PG_FINALLY();
	{
		etcd_set_deadline(old);
	}
	PG_END_TRY();
}

static void
add_hold(LocalLock *lock, bool xact)
{
	SubTransactionId subid;
	int			i;

	if (!xact)
	{
		lock->session_count++;
		return;
	}
	subid = GetCurrentSubTransactionId();
	for (i = 0; i < lock->nholds; i++)
		if (lock->holds[i].subid == subid)
			break;
	if (i == lock->nholds)
	{
		if (lock->nholds == MAX_XACT_HOLDS)
			ereport(ERROR,
					(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
					 errmsg("too many nested savepoints hold etcd lock \"%s\"", lock->name)));
		lock->holds[lock->nholds].subid = subid;
		lock->holds[lock->nholds++].count = 0;
	}
	lock->holds[i].count++;
	if (lock->xact_count++ == 0)
		xact_locks++;
}

/*
 * Queue for a lock with our key on one lease, and wait for it.  Returns
 * ETCD_RECIPE_OWNED with *myrev set, ETCD_RECIPE_WAIT when the wait ran out,
 * or ETCD_RECIPE_NOLEASE when etcd no longer has the lease.  Whatever does
 * not end in OWNED leaves no key behind, and the lease unpinned.
 */
static EtcdRecipeStatus
enqueue_and_wait(const char *etcd_name, const char *name, int lease_i,
				 const char *handle, long wait_ms, int64 *myrev)
{
	int64		lease_id = leases[lease_i].id;
	EtcdRecipeStatus status = ETCD_RECIPE_WAIT;
	char	   *pred = NULL;
	int64		watch_from = 0;
	TimestampTz deadline = 0;
	MemoryContext cxt = CurrentMemoryContext;
	MemoryContext round_cxt;
	char	   *kept = NULL;

	/* each round of waiting allocates here, reset per round: waits can be long */
	round_cxt = AllocSetContextCreate(cxt, "etcd_lock wait", ALLOCSET_SMALL_SIZES);

	if (wait_ms > 0)
		deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), wait_ms);

	PG_TRY();
	{
		/* lock_timeout bounds the whole acquisition, as for a table lock */
		if (LockTimeout > 0)
			enable_timeout_after(LOCK_TIMEOUT, LockTimeout);

		status = etcd_recipe_enqueue(etcd_name, handle, lease_id, myrev,
									 &pred, &watch_from);
		if (status == ETCD_RECIPE_LOST)
			ereport(ERROR,
					(errcode(ERRCODE_ETCD_LOCK_LOST),
					 errmsg("etcd lock \"%s\" was lost while waiting", name),
					 errdetail("Its key \"%s\" went from etcd as it was queued, most likely because its lease expired.",
							   handle)));
		while (status == ETCD_RECIPE_WAIT && wait_ms != 0)
		{
			int64		seen_at = watch_from - 1;	/* pred existed then */
			bool		checked = false;
			char	   *newpred = NULL;
			EtcdWatchEvent r;

			/* keep the predecessor's key, drop the rest of the last round */
			{
				char	   *copy = MemoryContextStrdup(cxt, pred);

				if (kept)
					pfree(kept);
				kept = pred = copy;
			}
			MemoryContextReset(round_cxt);
			MemoryContextSwitchTo(round_cxt);

			etcd_watch_start(pred);
			for (;;)
			{
				r = etcd_watch_wait(deadline);
				if (etcd_lease_slot_check(leases[lease_i].slot, lease_id) != ETCD_LEASE_RENEWING)
					ereport(ERROR,
							(errcode(ERRCODE_ETCD_LOCK_LOST),
							 errmsg("etcd lock \"%s\" was lost while waiting", name),
							 errdetail("Its lease %llx expired, was revoked, or could not be renewed in time.",
									   (unsigned long long) lease_id)));
				if (r == ETCD_WATCH_WAKEUP)
					continue;
				if (r != ETCD_WATCH_CREATED)
					break;
				/* nothing happened between our look and the watch's start */
				if (etcd_watch_revision() <= seen_at)
					continue;
				/* it may have: look again, with the watch already running */
				status = etcd_recipe_check(etcd_name, handle, *myrev, &newpred,
										   &watch_from);
				if (status == ETCD_RECIPE_WAIT && strcmp(newpred, pred) == 0)
					continue;	/* the watch covers its deletion */
				checked = true;
				break;
			}
			etcd_watch_stop();
			if (r == ETCD_WATCH_TIMEOUT)
				break;

			if (checked)
				pred = newpred;
			else
				status = etcd_recipe_check(etcd_name, handle, *myrev, &pred, &watch_from);
			if (status == ETCD_RECIPE_LOST)
				ereport(ERROR,
						(errcode(ERRCODE_ETCD_LOCK_LOST),
						 errmsg("etcd lock \"%s\" was lost while waiting", name),
						 errdetail("Its key \"%s\" is gone from etcd, most likely because its lease expired.",
								   handle)));
		}
		MemoryContextSwitchTo(cxt);
		if (LockTimeout > 0)
			disable_timeout(LOCK_TIMEOUT, false);
	}
	PG_CATCH();
	{
		HOLD_INTERRUPTS();
		MemoryContextSwitchTo(cxt);
		if (LockTimeout > 0)
			disable_timeout(LOCK_TIMEOUT, true);
		etcd_watch_stop();
		abandon_wait(lease_i, handle);
		RESUME_INTERRUPTS();
		PG_RE_THROW();
	}
	PG_END_TRY();

	if (status == ETCD_RECIPE_WAIT)
		abandon_wait(lease_i, handle);
	return status;
}

/*
 * Take the lock NAME (prefix added), waiting at most wait_ms (-1: forever).
 * Returns the handle, or NULL when the wait ran out.
 */
char *
etcd_lock_acquire(const char *name, int ttl, bool xact, long wait_ms)
{
	char	   *etcd_name = psprintf("%s%s", lock_prefix, name);
	LocalLock  *lock;
	bool		found;
	int			lease_i = -1;
	int64		lease_id;
	char	   *handle = NULL;
	int			slot;
	EtcdRecipeStatus status;
	int			attempt;
	int64		myrev = 0;
	int			i;

	local_init();
	check_lost();

	/* reentrant, and stacking session and transaction holds: one key */
	lock = hash_search(local_locks, etcd_name, HASH_FIND, NULL);
	if (lock != NULL && lock->lost)
	{
		char		old_key[ETCD_LOCK_KEY_MAX];
		int64		old_rev = lock->revision;

		/*
		 * Reported already.  Never queue behind our own dead key: delete it
		 * if etcd still has it (the worker is revoking its lease anyway).
		 */
		strlcpy(old_key, lock->handle, sizeof(old_key));
		lock_forget(lock);
		lock = NULL;
		etcd_recipe_release(old_key, old_rev, ERROR);
	}
	if (lock != NULL)
	{
		add_hold(lock, xact);
		etcd_lock_slot_update(lock->slot, ETCD_LOCK_HELD, lock->session_count,
							  lock->xact_count, lock->revision);
		return pstrdup(lock->handle);
	}

	/* room to release it, and its waiter key, without allocating later */
	pending_reserve(hash_get_num_entries(local_locks) + 2);

	/* the lock slot first: a full table must not cost a lease */
	slot = etcd_lock_slot_add(name, "", -1, 0, ttl, xact);
	if (slot < 0)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("too many etcd locks in use on this server"),
				 errhint("Increase etcd_lock.max_locks.")));

	PG_TRY();
	{
		for (attempt = 1;; attempt++)
		{
			lease_i = lease_for_ttl(ttl);
			lease_id = leases[lease_i].id;
			/* etcd's layout: NAME/ + the lease ID in lower-case hex, unpadded */
			handle = psprintf("%s/%llx", etcd_name, (unsigned long long) lease_id);
			etcd_lock_slot_attach(slot, handle, leases[lease_i].slot, lease_id);

			/*
			 * A release of this very key still pending would delete the key
			 * we are about to take (the enqueue adopts a key that is there):
			 * finish it first.
			 */
			for (i = npending - 1; i >= 0; i--)
				if (strcmp(pending[i].handle, handle) == 0)
					flush_one(i, ERROR);

			status = enqueue_and_wait(etcd_name, name, lease_i, handle,
									  wait_ms, &myrev);
			if (status != ETCD_RECIPE_NOLEASE)
				break;

			/*
			 * etcd dropped the lease before the worker noticed (revoked from
			 * outside).  Report the locks that rode on it, then take a new
			 * one.
			 */
			etcd_lease_slot_mark_gone(leases[lease_i].slot, lease_id);
			lease_users(lease_i, -1);
			check_lost();
			if (attempt == 3)
				ereport(ERROR,
						(errcode(ERRCODE_ETCD_LOCK_LOST),
						 errmsg("etcd dropped every lease granted for lock \"%s\"", name)));
		}
	}
	PG_CATCH();
	{
		etcd_lock_slot_remove(slot);
		PG_RE_THROW();
	}
	PG_END_TRY();

	if (status != ETCD_RECIPE_OWNED)
	{
		etcd_lock_slot_remove(slot);
		return NULL;
	}

	lock = hash_search(local_locks, etcd_name, HASH_ENTER, &found);
	strlcpy(lock->name, name, sizeof(lock->name));
	strlcpy(lock->handle, handle, sizeof(lock->handle));
	lock->lease = lease_i;
	lock->revision = myrev;
	lock->session_count = 0;
	lock->xact_count = 0;
	lock->nholds = 0;
	lock->slot = slot;
	lock->lost = false;
	add_hold(lock, xact);
	etcd_lock_slot_update(slot, ETCD_LOCK_HELD, lock->session_count,
						  lock->xact_count, myrev);
	etcd_stat_add(ETCD_STAT_ACQUIRED, 1);
	return handle;
}

/*
 * A handle from the user, for a message: cut to the longest a real handle
 * can be, so that a huge argument is not echoed back whole.
 */
static char *
handle_for_message(const char *handle)
{
	int			len = strlen(handle);

	if (len < ETCD_LOCK_KEY_MAX)
		return pstrdup(handle);
	len = pg_mbcliplen(handle, len, ETCD_LOCK_KEY_MAX - 1);
	return psprintf("%.*s...", len, handle);
}

/* ----------------------------------------------------------------
 * Releasing from SQL
 * ----------------------------------------------------------------
 */

static LocalLock *
lock_by_handle(const char *handle)
{
	HASH_SEQ_STATUS seq;
	LocalLock  *lock;

	if (local_locks == NULL)
		return NULL;
	hash_seq_init(&seq, local_locks);
	while ((lock = hash_seq_search(&seq)) != NULL)
	{
		if (strcmp(lock->handle, handle) == 0)
		{
			hash_seq_term(&seq);
			return lock;
		}
	}
	return NULL;
}

/*
 * Forget a lock, then delete its key, reporting etcd's failure as an ERROR.
 * The request may have reached etcd even when its answer did not, so after
 * an ERROR the lock is not held any more as far as this session knows; its
 * key is left to the worker or to the next call.  Returns false if the key
 * was gone already.
 */
static bool
release_for_sql(LocalLock *lock)
{
	EtcdReleaseStatus r;

	if (lock->lost || leases[lock->lease].lost)
	{
		lock_forget(lock);
		return false;
	}
	queue_release(lock);
	PG_TRY();
	{
		r = flush_one(npending - 1, ERROR);
	}
	PG_CATCH();
	{
		hand_pending_to_worker();
		PG_RE_THROW();
	}
	PG_END_TRY();
	if (r == ETCD_RELEASE_GONE)
		etcd_stat_add(ETCD_STAT_LOST, 1);
	return r == ETCD_RELEASE_DELETED;
}

/* Release one hold of a session lock; the last hold deletes the key. */
bool
etcd_lock_release(const char *handle)
{
	LocalLock  *lock;
	char		name[ETCD_LOCK_NAME_MAX];
	char		key[ETCD_LOCK_KEY_MAX];

	check_lost();
	lock = lock_by_handle(handle);
	if (lock == NULL || lock->session_count == 0)
	{
		ereport(WARNING,
				(errcode(ERRCODE_LOCK_NOT_AVAILABLE),
				 errmsg("you don't own a session-level etcd lock with this handle"),
				 errdetail("The handle given was \"%s\".", handle_for_message(handle))));
		return false;
	}
	if (lock->session_count + lock->xact_count > 1 && !lock->lost)
	{
		lock->session_count--;
		etcd_lock_slot_update(lock->slot, ETCD_LOCK_HELD, lock->session_count,
							  lock->xact_count, lock->revision);
		return true;
	}

	strlcpy(name, lock->name, sizeof(name));
	strlcpy(key, lock->handle, sizeof(key));
	if (lock->lost)
	{
		/* a transaction hold keeps it listed until the doomed transaction ends */
		if (--lock->session_count + lock->xact_count == 0)
			lock_forget(lock);
	}
	else if (release_for_sql(lock))
		return true;
	ereport(WARNING,
			(errcode(ERRCODE_ETCD_LOCK_LOST),
			 errmsg("etcd lock \"%s\" was lost before it was released", name),
			 errdetail("The key \"%s\" was no longer in etcd.", key)));
	return false;
}

/*
 * Release every session hold.  A lease whose every lock goes is revoked,
 * which deletes all its keys in one request.
 */
int
etcd_lock_release_all(void)
{
	HASH_SEQ_STATUS seq;
	LocalLock  *lock;
	int		   *going;
	char	  **names;
	int			nnames = 0;
	int			released = 0;
	int			i;

	check_lost();
	if (local_locks == NULL)
		return 0;

	/*
	 * Collect first: releases can fail, and an ERROR must not escape from
	 * the middle of a hash scan.
	 */
	going = palloc0(sizeof(int) * nleases);
	names = palloc(sizeof(char *) * (hash_get_num_entries(local_locks) + 1));
	hash_seq_init(&seq, local_locks);
	while ((lock = hash_seq_search(&seq)) != NULL)
	{
		if (lock->session_count == 0)
			continue;
		names[nnames++] = pstrdup(lock->etcd_name);
		if (lock->xact_count == 0)
			going[lock->lease]++;
	}

	/* a lease whose every lock goes is revoked: one request for all its keys */
	for (i = 0; i < nleases; i++)
	{
		int64		id = leases[i].id;
		int			slot = leases[i].slot;

		if (id == 0 || leases[i].lost || going[i] != leases[i].nusers)
			continue;

		/*
		 * Forget its locks before the request: if it fails, etcd may still
		 * have applied it, so the session cannot claim the locks any more.
		 * The worker then revokes the lease until etcd answers.
		 */
		hash_seq_init(&seq, local_locks);
		while ((lock = hash_seq_search(&seq)) != NULL)
		{
			if (lock->lease != i)
				continue;
			released++;
			etcd_stat_add(ETCD_STAT_RELEASED, 1);
			lock_forget(lock);
		}
		leases[i].id = 0;
		leases[i].nusers = 0;
		etcd_lease_slot_give_up(slot, id, backend_grace_ms());
		revoke_given_up(slot, id, ERROR);
	}

	for (i = 0; i < nnames; i++)
	{
		lock = hash_search(local_locks, names[i], HASH_FIND, NULL);
		if (lock == NULL || lock->session_count == 0)
			continue;
		if (lock->xact_count > 0)
		{
			lock->session_count = 0;
			etcd_lock_slot_update(lock->slot, ETCD_LOCK_HELD, 0,
								  lock->xact_count, lock->revision);
			continue;
		}
		if (!lock->lost)
			released++;
		release_for_sql(lock);
	}
	return released;
}

/* etcd_lock_token(): the create_revision of a lock this session holds. */
int64
etcd_lock_token(const char *handle)
{
	LocalLock  *lock;

	check_lost();
	lock = lock_by_handle(handle);
	if (lock == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("this session holds no etcd lock with handle \"%s\"",
						handle_for_message(handle))));
	if (lock->lost)
		ereport(ERROR,
				(errcode(ERRCODE_ETCD_LOCK_LOST),
				 errmsg("etcd lock \"%s\" was lost", lock->name)));
	return lock->revision;
}

/* ----------------------------------------------------------------
 * Transaction end
 * ----------------------------------------------------------------
 */

/*
 * Before COMMIT makes the writes durable, confirm with etcd that every
 * transaction lock is still ours, in one request.  An ERROR here aborts the
 * transaction, so a writer that lost its lock never commits.
 */
static void
commit_check(void)
{
	HASH_SEQ_STATUS seq;
	LocalLock  *lock;
	LocalLock **locks = palloc(sizeof(LocalLock *) * xact_locks);
	const char **keys = palloc(sizeof(char *) * xact_locks);
	int64	   *revs = palloc(sizeof(int64) * xact_locks);
	int			n = 0;
	int			done;

	/* a loss the worker already saw needs no request */
	check_lost();
	if (!commit_check_on)
		return;

	hash_seq_init(&seq, local_locks);
	while ((lock = hash_seq_search(&seq)) != NULL)
	{
		if (lock->xact_count == 0)
			continue;
		locks[n] = lock;
		keys[n] = lock->handle;
		revs[n++] = lock->revision;
	}

	/* etcd allows 128 operations per txn by default */
	for (done = 0; done < n; done += 128)
	{
		int			bad = etcd_recipe_verify(keys + done, revs + done, Min(128, n - done));

		if (bad >= 0)
		{
			lock = locks[done + bad];
			lock->lost = true;
			etcd_stat_add(ETCD_STAT_LOST, 1);
			ereport(ERROR,
					(errcode(ERRCODE_ETCD_LOCK_LOST),
					 errmsg("etcd transaction lock \"%s\" was lost before commit", lock->name),
					 errdetail("Its key \"%s\" is no longer in etcd with revision " INT64_FORMAT ", so another holder may have taken the lock.",
							   lock->handle, lock->revision),
					 errhint("The transaction was rolled back; retry it.")));
		}
	}
}

/*
 * Drop every transaction hold; the last hold of a lock forgets it and queues
 * its key.  No request: cleanup_releases() sends them.
 */
static void
release_xact_locks(void)
{
	HASH_SEQ_STATUS seq;
	LocalLock  *lock;

	hash_seq_init(&seq, local_locks);
	while ((lock = hash_seq_search(&seq)) != NULL)
	{
		if (lock->xact_count == 0)
			continue;
		lock->nholds = 0;
		if (lock->session_count > 0)
		{
			lock->xact_count = 0;
			xact_locks--;
			etcd_lock_slot_update(lock->slot, ETCD_LOCK_HELD, lock->session_count,
								  0, lock->revision);
			continue;
		}
		queue_release(lock);	/* removing the current entry is allowed */
	}
}

static void
etcd_lock_xact_callback(XactEvent event, void *arg)
{
	MemoryContext old;

	if (xact_locks == 0)
		return;
	/* the caller's context may live long (a procedure's): use our own */
	MemoryContextReset(callback_cxt);
	old = MemoryContextSwitchTo(callback_cxt);
	switch (event)
	{
		case XACT_EVENT_PRE_COMMIT:
			commit_check();
			break;
		case XACT_EVENT_PRE_PREPARE:
			ereport(ERROR,
					(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
					 errmsg("cannot PREPARE a transaction that holds etcd transaction locks"),
					 errdetail("etcd locks belong to this session's leases and cannot outlive it.")));
			break;

			/*
			 * COMMIT runs after the commit record is written and the
			 * transaction is visible to others, so the next holder sees our
			 * writes.  Interrupts are held off here, and nothing may throw.
			 */
		case XACT_EVENT_COMMIT:
			/* with synchronous_commit off, the commit record may still be in memory */
			if (XactLastCommitEnd != InvalidXLogRecPtr)
				XLogFlush(XactLastCommitEnd);
			release_xact_locks();
			cleanup_releases();
			break;
		case XACT_EVENT_ABORT:
			release_xact_locks();
			cleanup_releases();
			break;
		default:
			break;
	}
	MemoryContextSwitchTo(old);
}

static void
etcd_lock_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
						   SubTransactionId parentSubid, void *arg)
{
	HASH_SEQ_STATUS seq;
	LocalLock  *lock;
	MemoryContext old;

	if (xact_locks == 0 ||
		(event != SUBXACT_EVENT_COMMIT_SUB && event != SUBXACT_EVENT_ABORT_SUB))
		return;
	MemoryContextReset(callback_cxt);
	old = MemoryContextSwitchTo(callback_cxt);

	hash_seq_init(&seq, local_locks);
	while ((lock = hash_seq_search(&seq)) != NULL)
	{
		int			i;
		int			parent = -1;

		for (i = 0; i < lock->nholds; i++)
			if (lock->holds[i].subid == parentSubid)
				parent = i;
		for (i = 0; i < lock->nholds; i++)
		{
			if (lock->holds[i].subid != mySubid)
				continue;
			if (event == SUBXACT_EVENT_COMMIT_SUB)
			{
				/* a released savepoint's holds belong to its parent */
				if (parent >= 0)
				{
					lock->holds[parent].count += lock->holds[i].count;
					lock->holds[i] = lock->holds[--lock->nholds];
				}
				else
					lock->holds[i].subid = parentSubid;
			}
			else
			{
				/* a rolled-back savepoint's holds are released */
				lock->xact_count -= lock->holds[i].count;
				lock->holds[i] = lock->holds[--lock->nholds];
				if (lock->xact_count == 0)
				{
					xact_locks--;
					if (lock->session_count == 0)
					{
						lock->xact_count = 0;
						queue_release(lock);
						break;
					}
					etcd_lock_slot_update(lock->slot, ETCD_LOCK_HELD,
										  lock->session_count, 0, lock->revision);
				}
				else
					etcd_lock_slot_update(lock->slot, ETCD_LOCK_HELD,
										  lock->session_count, lock->xact_count,
										  lock->revision);
			}
			break;
		}
	}
	if (event == SUBXACT_EVENT_ABORT_SUB)
		cleanup_releases();
	MemoryContextSwitchTo(old);
}

/*
 * Session end, normal or by pg_terminate_backend: give every lease up, which
 * deletes every key of this session, held or waiting.  Everything is handed
 * to the worker first, without a request, so that whatever happens next
 * nothing stays behind; then this backend tries the revokes itself, under
 * one deadline.  On a crash nothing runs here: the postmaster carries the
 * leases over the restart for the new worker to revoke.  This runs before
 * the transaction abort of a dying backend, so it forgets everything.
 */
static void
etcd_lock_exit(int code, Datum arg)
{
	HASH_SEQ_STATUS seq;
	LocalLock  *lock;
	int			i;

	HOLD_INTERRUPTS();
	MemoryContextSwitchTo(callback_cxt);
	etcd_watch_stop();

	/* bookkeeping first: no request, no allocation */
	hash_seq_init(&seq, local_locks);
	while ((lock = hash_seq_search(&seq)) != NULL)
	{
		if (!lock->lost)
			etcd_stat_add(ETCD_STAT_RELEASED, 1);
		etcd_lock_slot_remove(lock->slot);
		hash_search(local_locks, lock->etcd_name, HASH_REMOVE, NULL);
	}
	xact_locks = 0;
	npending = 0;
	for (i = 0; i < nleases; i++)
	{
		if (leases[i].id == 0)
			continue;
		/* the worker waits a moment for us, then revokes what is left */
		etcd_lease_slot_give_up(leases[i].slot, leases[i].id,
								leases[i].lost ? 0 : backend_grace_ms());
		if (leases[i].lost)
			leases[i].id = 0;
	}
	/* also the slots of a wait or grant that a FATAL interrupted */
	etcd_shmem_forget_backend();

	/*
	 * Then the revokes, under one deadline.  An ERROR here would be promoted
	 * to FATAL by proc_exit, cutting this short: the worker then finishes.
	 */
	if (!in_error_recursion_trouble())
	{
		bool		reachable = true;

		etcd_set_deadline(TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
													  etcd_lock_request_timeout));
		for (i = 0; i < nleases; i++)
		{
			if (leases[i].id == 0)
				continue;
			/* one failure is enough: the worker revokes the rest */
			if (reachable)
				reachable = revoke_given_up(leases[i].slot, leases[i].id, WARNING);
			else
				etcd_lease_slot_give_up(leases[i].slot, leases[i].id, 0);
			leases[i].id = 0;
		}
		etcd_set_deadline(0);
	}
	RESUME_INTERRUPTS();
}

/* ----------------------------------------------------------------
 * Settings
 * ----------------------------------------------------------------
 */

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

void
etcd_locks_define_settings(void)
{
	DefineCustomStringVariable("etcd_lock.prefix",
							   "Namespace prepended to every lock name in etcd.",
							   "Empty, or ending in \"/\". Empty maps names 1:1 onto etcd's.",
							   &lock_prefix,
							   "etcd_lock/",
							   PGC_SUSET, 0,
							   check_prefix, NULL, NULL);

	DefineCustomBoolVariable("etcd_lock.commit_check",
							 "Confirms with etcd before COMMIT that every transaction lock is still held.",
							 "Costs one request per transaction; without it a lock lost unnoticed lets the transaction commit.",
							 &commit_check_on,
							 true,
							 PGC_USERSET, 0,
							 NULL, NULL, NULL);
}
