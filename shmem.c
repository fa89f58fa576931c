/*-------------------------------------------------------------------------
 *
 * shmem.c
 *		  The shared-memory lease and lock tables, their lifecycle, and the
 *		  statistics.
 *
 * This is the only file that touches the shared tables or takes their
 * LWLock.  Backends and the lease worker move a slot from state to state
 * through the functions below, each of which is one short critical section;
 * the LWLock is never held across a network request.
 *
 * Lease slots
 * -----------
 *
 *		 reserve            fill              worker: etcd says gone,
 *	FREE -------> GRANTING -----> RENEWING ---- or the budget ran out;
 *	 ^  <-------  (backend)      (worker     \  backend: lease not found,
 *	 |   cancel                   renews)     \ or unrenewed past its TTL
 *	 |                              |          v
 *	 |                    give_up,  |         LOST --- owner acknowledges
 *	 |                    idle or   |   (worker revokes   (give_up)  |
 *	 |                    stolen    v    unless gone)                |
 *	 +-------------------------- REVOKING <--------------------------+
 *	   revoked, not found, or    (worker, or the backend first)
 *	   past the time etcd would keep it
 *
 * Who may make which transition:
 *	- FREE -> GRANTING: a backend reserving a slot before it asks etcd for a
 *	  lease, so that a full table costs no request.
 *	- GRANTING -> RENEWING (fill) or FREE (cancel): that backend.
 *	- RENEWING -> LOST: the worker, when a keepalive answer has no TTL or no
 *	  renewal attempt can succeed before the lease expires; or the owner,
 *	  when etcd answers "lease not found", or when it finds the lease
 *	  unrenewed past its expiry (a stalled worker).  Loss is final.
 *	- RENEWING or LOST -> REVOKING: the owner giving the lease up (release,
 *	  abandoned wait, session end), the worker giving back a lease idle for
 *	  IDLE_LEASE_MS, or a backend stealing an idle lease when the table is
 *	  full.  A LOST lease that etcd already dropped goes straight to FREE.
 *	- REVOKING -> FREE: whoever gets etcd's answer to the revoke; the worker
 *	  also frees it once etcd would have expired the lease anyway.
 *
 * A slot's owner (pid) is set in GRANTING, RENEWING and LOST, and 0 in
 * REVOKING: a revoking slot belongs to the worker alone.  The owner keeps
 * `nusers`, the number of keys it has on the lease, so that idle leases can
 * be given back and stolen without touching a lock.
 *
 * Lock slots only feed the etcd_locks view; each belongs to one backend.
 *
 * Locking issues
 * --------------
 * One LWLock protects both tables.  Every function here takes it once,
 * copies or changes a few fields, and releases it before doing anything
 * else (logging, setting a latch).  Statistics are atomics, outside it.
 *
 * After a crash of a backend, the postmaster reinitializes shared memory.
 * Before the old tables go away, the postmaster copies the lease IDs still
 * in use, and the new tables start with them in REVOKING: the new worker
 * revokes them at once, so the locks of the killed sessions come free
 * within a second instead of after their TTL.
 *
 * IDENTIFICATION
 *		  shmem.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "port/atomics.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/guc.h"
#include "utils/timestamp.h"

#include "shmem.h"

/* etcd_lock.max_locks, fixed at server start */
int			etcd_lock_max_locks = 1024;

/* A lease with no key on it is given back after this long. */
#define IDLE_LEASE_MS		10000

/*
 * A backend that finds its lease unrenewed this long past its expiry marks
 * it lost itself: the worker has had time to act on any late answer.
 */
#define OWNER_GRACE_MS		250

typedef struct LeaseSlot
{
	EtcdLeaseState state;
	int64		lease_id;
	int			ttl;			/* granted TTL, seconds */
	int			pid;			/* owner; 0 in FREE and REVOKING */
	Latch	   *owner_latch;	/* set when the lease is found lost */
	int			nusers;			/* keys the owner has on the lease */
	bool		gone;			/* etcd no longer has it: nothing to revoke */
	TimestampTz idle_since;		/* when nusers last dropped to 0 */
	TimestampTz expires_at;		/* etcd keeps the lease at least until then */
	TimestampTz next_due;		/* the worker's next request for it */
	TimestampTz revoke_until;	/* after this, etcd has surely dropped it */
} LeaseSlot;

typedef struct LockSlot
{
	EtcdLockRow row;
	int			lease_slot;
	bool		used;
} LockSlot;

typedef struct EtcdLockShared
{
	LWLock	   *lock;			/* protects everything below but stats */
	Latch	   *worker_latch;	/* NULL while no worker runs */
	int			worker_pid;
	TimestampTz last_renewal;	/* the worker's last successful keepalive */
	pg_atomic_uint64 stats[ETCD_NSTATS];	/* indexed by EtcdStat */
	LeaseSlot  *leases;			/* etcd_lock_max_locks entries */
	LockSlot   *locks;			/* etcd_lock_max_locks entries */
} EtcdLockShared;

static EtcdLockShared *shared = NULL;

/* In the postmaster only: leases carried across a crash restart. */
typedef struct CarriedLease
{
	int64		lease_id;
	int			ttl;
} CarriedLease;

static CarriedLease *carried = NULL;
static int	ncarried = 0;

static Size
shmem_size(void)
{
	Size		size = MAXALIGN(sizeof(EtcdLockShared));

	size = add_size(size, mul_size(etcd_lock_max_locks, sizeof(LeaseSlot)));
	size = add_size(size, mul_size(etcd_lock_max_locks, sizeof(LockSlot)));
	return size;
}

void
etcd_shmem_define_settings(void)
{
	/* a PGC_POSTMASTER setting can only be defined while preloading */
	if (process_shared_preload_libraries_in_progress)
		DefineCustomIntVariable("etcd_lock.max_locks",
								"Maximum number of etcd locks, and of leases, on this server.",
								NULL,
								&etcd_lock_max_locks,
								1024, 16, 1000000,
								PGC_POSTMASTER, 0,
								NULL, NULL, NULL);
}

void
etcd_shmem_request(void)
{
	RequestAddinShmemSpace(shmem_size());
	RequestNamedLWLockTranche("etcd_lock", 1);
}

/*
 * Runs in the postmaster while the old shared memory is still mapped, before
 * a crash restart (or at shutdown, harmlessly): remember the leases that
 * etcd may still keep.  No other process is alive, so no lock is needed.
 */
static void
carry_leases(int code, Datum arg)
{
	int			i;

	if (shared == NULL)
		return;
	free(carried);
	carried = malloc(sizeof(CarriedLease) * etcd_lock_max_locks);
	ncarried = 0;
	if (carried == NULL)
		return;
	for (i = 0; i < etcd_lock_max_locks; i++)
	{
		LeaseSlot  *s = &shared->leases[i];

		if (s->state != ETCD_LEASE_FREE && s->lease_id > 0 && !s->gone)
		{
			carried[ncarried].lease_id = s->lease_id;
			carried[ncarried++].ttl = s->ttl;
		}
	}
	shared = NULL;
}

void
etcd_shmem_startup(void)
{
	bool		found;

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	shared = ShmemInitStruct("etcd_lock", shmem_size(), &found);
	if (!found)
	{
		char	   *p = (char *) shared;
		TimestampTz now = GetCurrentTimestamp();
		int			i;

		memset(shared, 0, shmem_size());
		shared->lock = &(GetNamedLWLockTranche("etcd_lock"))->lock;
		for (i = 0; i < ETCD_NSTATS; i++)
			pg_atomic_init_u64(&shared->stats[i], 0);
		p += MAXALIGN(sizeof(EtcdLockShared));
		shared->leases = (LeaseSlot *) p;
		p += mul_size(etcd_lock_max_locks, sizeof(LeaseSlot));
		shared->locks = (LockSlot *) p;

		/* the killed sessions' leases: the new worker revokes them first */
		for (i = 0; i < ncarried && i < etcd_lock_max_locks; i++)
		{
			LeaseSlot  *s = &shared->leases[i];

			s->state = ETCD_LEASE_REVOKING;
			s->lease_id = carried[i].lease_id;
			s->ttl = carried[i].ttl;
			s->next_due = now;
			s->revoke_until = TimestampTzPlusMilliseconds(now, (int64) carried[i].ttl * 1000 + 1000);
		}
		if (ncarried > 0)
			ereport(LOG,
					(errmsg_plural("revoking %d etcd lease of a session that ended in the crash",
								   "revoking %d etcd leases of sessions that ended in the crash",
								   ncarried, ncarried)));
		ncarried = 0;
	}
	LWLockRelease(AddinShmemInitLock);

	if (!IsUnderPostmaster)
		on_shmem_exit(carry_leases, (Datum) 0);
}

bool
etcd_shmem_ready(void)
{
	return shared != NULL;
}

void
etcd_stat_add(EtcdStat which, uint64 n)
{
	if (shared != NULL)
		pg_atomic_fetch_add_u64(&shared->stats[which], n);
}

static void
wake_worker(void)
{
	Latch	   *latch;

	LWLockAcquire(shared->lock, LW_SHARED);
	latch = shared->worker_latch;
	LWLockRelease(shared->lock);
	if (latch)
		SetLatch(latch);
}

/* Locks riding on a lease slot; the caller holds the LWLock. */
static int
locks_on_slot(int slot)
{
	int			n = 0;
	int			i;

	for (i = 0; i < etcd_lock_max_locks; i++)
		if (shared->locks[i].used && shared->locks[i].lease_slot == slot)
			n++;
	return n;
}

/* Whether slot holds lease_id for this backend. */
static inline bool
owned(LeaseSlot *s, int64 lease_id)
{
	return s->lease_id == lease_id && s->pid == MyProcPid &&
		(s->state == ETCD_LEASE_GRANTING || s->state == ETCD_LEASE_RENEWING ||
		 s->state == ETCD_LEASE_LOST);
}

/*
 * RENEWING -> LOST.  Caller holds the LWLock exclusively; it reports and
 * wakes the owner once it has released it.
 */
static Latch *
to_lost(LeaseSlot *s, int slot, bool gone, int *nlost)
{
	s->state = ETCD_LEASE_LOST;
	s->gone = gone;
	s->next_due = 0;			/* the worker revokes it now, unless gone */
	*nlost = locks_on_slot(slot);
	return s->owner_latch;
}

/* -> REVOKING, the worker's from now; next_due is when it starts. */
static void
to_revoking(LeaseSlot *s, TimestampTz next_due)
{
	TimestampTz now = GetCurrentTimestamp();

	if (s->gone)
	{
		s->state = ETCD_LEASE_FREE;
		return;
	}
	s->state = ETCD_LEASE_REVOKING;
	s->pid = 0;
	s->owner_latch = NULL;
	s->nusers = 0;
	s->next_due = next_due;

	/*
	 * A keepalive sent before expires_at may still have reached etcd just in
	 * time, so etcd keeps the lease at most one more TTL after it.
	 */
	s->revoke_until = TimestampTzPlusMilliseconds(Max(s->expires_at, now),
												  (int64) s->ttl * 1000 + 1000);
}

/*
 * Mark lost every lease left unrenewed past its expiry: the worker is
 * stalled, and a view must not show such a lock as held.  Caller holds the
 * LWLock exclusively; returns how many locks were lost.
 */
static int
expire_overdue(void)
{
	TimestampTz now = GetCurrentTimestamp();
	int			total = 0;
	int			i;

	for (i = 0; i < etcd_lock_max_locks; i++)
	{
		LeaseSlot  *s = &shared->leases[i];
		int			nlost;

		if (s->state == ETCD_LEASE_RENEWING &&
			now >= TimestampTzPlusMilliseconds(s->expires_at, OWNER_GRACE_MS))
		{
			Latch	   *owner = to_lost(s, i, false, &nlost);

			total += nlost;
			if (owner)
				SetLatch(owner);
		}
	}
	return total;
}

/* ----------------------------------------------------------------
 * Lease slots: the backend's side
 * ----------------------------------------------------------------
 */

/* FREE -> GRANTING; -1 when the table is full. */
int
etcd_lease_slot_reserve(void)
{
	int			i;

	LWLockAcquire(shared->lock, LW_EXCLUSIVE);
	for (i = 0; i < etcd_lock_max_locks; i++)
	{
		LeaseSlot  *s = &shared->leases[i];

		if (s->state == ETCD_LEASE_FREE)
		{
			memset(s, 0, sizeof(LeaseSlot));
			s->state = ETCD_LEASE_GRANTING;
			s->pid = MyProcPid;
			s->owner_latch = MyLatch;
			break;
		}
	}
	LWLockRelease(shared->lock);
	return i < etcd_lock_max_locks ? i : -1;
}

/* GRANTING -> FREE: the grant failed. */
void
etcd_lease_slot_cancel(int slot)
{
	LeaseSlot  *s = &shared->leases[slot];

	LWLockAcquire(shared->lock, LW_EXCLUSIVE);
	if (s->state == ETCD_LEASE_GRANTING && s->pid == MyProcPid)
		s->state = ETCD_LEASE_FREE;
	LWLockRelease(shared->lock);
}

/*
 * GRANTING -> RENEWING, pinned by one user, so that it cannot be taken back
 * as idle before the lock it was granted for uses it.  etcd started the TTL
 * no earlier than sent_at, when the grant went out; the first keepalive is
 * due a third of a TTL later.
 */
void
etcd_lease_slot_fill(int slot, int64 lease_id, int ttl, TimestampTz sent_at)
{
	LeaseSlot  *s = &shared->leases[slot];

	LWLockAcquire(shared->lock, LW_EXCLUSIVE);
	s->state = ETCD_LEASE_RENEWING;
	s->lease_id = lease_id;
	s->ttl = ttl;
	s->nusers = 1;				/* pinned by the lock it was granted for */
	s->gone = false;
	s->idle_since = 0;
	s->expires_at = TimestampTzPlusMilliseconds(sent_at, (int64) ttl * 1000);
	s->next_due = TimestampTzPlusMilliseconds(sent_at, (int64) ttl * 1000 / 3);
	LWLockRelease(shared->lock);
	wake_worker();
}

/*
 * The owner's count of keys on its lease.  Going from 0 to more pins the
 * lease, which fails (false) when the worker or another backend has taken
 * the idle lease back, or it is lost.
 */
bool
etcd_lease_slot_set_users(int slot, int64 lease_id, int nusers)
{
	LeaseSlot  *s = &shared->leases[slot];
	bool		ok;

	LWLockAcquire(shared->lock, LW_EXCLUSIVE);
	ok = owned(s, lease_id) && (s->state == ETCD_LEASE_RENEWING || nusers <= s->nusers);
	if (ok)
	{
		s->nusers = nusers;
		if (nusers == 0)
			s->idle_since = GetCurrentTimestamp();
	}
	LWLockRelease(shared->lock);
	return ok;
}

/*
 * The state of our lease as its owner sees it: RENEWING, LOST, or FREE when
 * it is no longer ours (given back while idle).  A lease unrenewed past its
 * expiry is marked lost here, so that a stalled worker cannot make this
 * backend vouch for a lock etcd may have given away.
 */
EtcdLeaseState
etcd_lease_slot_check(int slot, int64 lease_id)
{
	LeaseSlot  *s = &shared->leases[slot];
	EtcdLeaseState state;
	TimestampTz now = GetCurrentTimestamp();
	int			nlost = 0;
	bool		expired = false;

	LWLockAcquire(shared->lock, LW_SHARED);
	if (!owned(s, lease_id))
		state = ETCD_LEASE_FREE;
	else
	{
		state = s->state;
		expired = state == ETCD_LEASE_RENEWING &&
			now >= TimestampTzPlusMilliseconds(s->expires_at, OWNER_GRACE_MS);
	}
	LWLockRelease(shared->lock);
	if (!expired)
		return state;

	LWLockAcquire(shared->lock, LW_EXCLUSIVE);
	if (owned(s, lease_id) && s->state == ETCD_LEASE_RENEWING &&
		now >= TimestampTzPlusMilliseconds(s->expires_at, OWNER_GRACE_MS))
		to_lost(s, slot, false, &nlost);
	state = owned(s, lease_id) ? s->state : ETCD_LEASE_FREE;
	LWLockRelease(shared->lock);
	if (nlost > 0 || state == ETCD_LEASE_LOST)
	{
		etcd_stat_add(ETCD_STAT_LOST, nlost);
		wake_worker();		/* to revoke it as soon as etcd answers */
	}
	return state;
}

/* RENEWING -> LOST: etcd itself said it has no such lease. */
void
etcd_lease_slot_mark_gone(int slot, int64 lease_id)
{
	LeaseSlot  *s = &shared->leases[slot];
	int			nlost = 0;

	LWLockAcquire(shared->lock, LW_EXCLUSIVE);
	if (owned(s, lease_id))
	{
		if (s->state == ETCD_LEASE_RENEWING)
			to_lost(s, slot, true, &nlost);
		s->gone = true;
	}
	LWLockRelease(shared->lock);
	etcd_stat_add(ETCD_STAT_LOST, nlost);
}

/*
 * The owner gives its lease up: -> REVOKING (FREE when etcd dropped it
 * already).  With backend_tries, the worker waits `grace_ms` before it
 * steps in, while the backend revokes the lease itself.
 */
void
etcd_lease_slot_give_up(int slot, int64 lease_id, long grace_ms)
{
	LeaseSlot  *s = &shared->leases[slot];
	bool		wake = false;

	LWLockAcquire(shared->lock, LW_EXCLUSIVE);
	if (owned(s, lease_id))
	{
		if (s->state == ETCD_LEASE_GRANTING)
			s->state = ETCD_LEASE_FREE;
		else
		{
			to_revoking(s, TimestampTzPlusMilliseconds(GetCurrentTimestamp(), grace_ms));
			wake = grace_ms == 0;
		}
	}
	else if (s->lease_id == lease_id && s->state == ETCD_LEASE_REVOKING &&
			 grace_ms == 0)
	{
		/* ours until lately: the backend could not revoke it after all */
		s->next_due = GetCurrentTimestamp();
		wake = true;
	}
	LWLockRelease(shared->lock);
	if (wake)
		wake_worker();
}

/* REVOKING -> FREE, or LOST -> gone: etcd confirmed the revoke. */
void
etcd_lease_slot_revoked(int slot, int64 lease_id)
{
	LeaseSlot  *s = &shared->leases[slot];

	LWLockAcquire(shared->lock, LW_EXCLUSIVE);
	if (s->lease_id == lease_id)
	{
		if (s->state == ETCD_LEASE_REVOKING)
			s->state = ETCD_LEASE_FREE;
		else if (s->state == ETCD_LEASE_LOST)
			s->gone = true;
	}
	LWLockRelease(shared->lock);
}

/*
 * The table is full: take the idle lease (no key on it) that has been idle
 * longest, whoever owns it, and move it to REVOKING; or else a lease being
 * revoked already.  The caller revokes it and frees the slot; the worker
 * steps in after grace_ms if it does not.  Returns the slot and sets
 * *lease_id, or -1 when every lease carries a lock.
 */
int
etcd_lease_slot_steal_idle(int64 *lease_id, long grace_ms)
{
	int			best = -1;
	int			i;

	LWLockAcquire(shared->lock, LW_EXCLUSIVE);
	for (i = 0; i < etcd_lock_max_locks; i++)
	{
		LeaseSlot  *s = &shared->leases[i];

		if (s->state == ETCD_LEASE_RENEWING && s->nusers == 0 &&
			(best < 0 || s->idle_since < shared->leases[best].idle_since))
			best = i;
	}
	if (best >= 0)
	{
		*lease_id = shared->leases[best].lease_id;
		to_revoking(&shared->leases[best],
					TimestampTzPlusMilliseconds(GetCurrentTimestamp(), grace_ms));
	}
	else
	{
		/*
		 * No idle lease, but maybe one the worker has yet to revoke (after an
		 * outage, say): the caller revokes it itself, alongside the worker.
		 */
		for (i = 0; i < etcd_lock_max_locks && best < 0; i++)
			if (shared->leases[i].state == ETCD_LEASE_REVOKING)
				best = i;
		if (best >= 0)
			*lease_id = shared->leases[best].lease_id;
	}
	LWLockRelease(shared->lock);
	return best;
}

/*
 * A backend is leaving: its leases go to the worker to revoke (the exit
 * callback gave them up already unless it was cut short), and its lock
 * slots are freed.
 */
void
etcd_shmem_forget_backend(void)
{
	int			i;
	bool		wake = false;

	LWLockAcquire(shared->lock, LW_EXCLUSIVE);
	for (i = 0; i < etcd_lock_max_locks; i++)
	{
		LeaseSlot  *s = &shared->leases[i];

		if (s->pid == MyProcPid && s->state != ETCD_LEASE_FREE &&
			s->state != ETCD_LEASE_REVOKING)
		{
			if (s->state == ETCD_LEASE_GRANTING)
				s->state = ETCD_LEASE_FREE;
			else
			{
				to_revoking(s, 0);
				wake = true;
			}
		}
		if (shared->locks[i].used && shared->locks[i].row.pid == MyProcPid)
			shared->locks[i].used = false;
	}
	LWLockRelease(shared->lock);
	if (wake)
		wake_worker();
}

/* ----------------------------------------------------------------
 * Lease slots: the worker's side
 * ----------------------------------------------------------------
 */

void
etcd_worker_attach(void)
{
	LWLockAcquire(shared->lock, LW_EXCLUSIVE);
	shared->worker_latch = MyLatch;
	shared->worker_pid = MyProcPid;
	LWLockRelease(shared->lock);
}

void
etcd_worker_detach(void)
{
	LWLockAcquire(shared->lock, LW_EXCLUSIVE);
	shared->worker_latch = NULL;
	shared->worker_pid = 0;
	LWLockRelease(shared->lock);
}

/*
 * Copy every slot the worker has to look at into out[] (max_locks entries);
 * returns how many.  Idle leases past IDLE_LEASE_MS are given back here.
 */
int
etcd_lease_table_snapshot(EtcdLeaseView *out)
{
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz idle_before = TimestampTzPlusMilliseconds(now, -IDLE_LEASE_MS);
	int			n = 0;
	int			i;

	LWLockAcquire(shared->lock, LW_EXCLUSIVE);
	for (i = 0; i < etcd_lock_max_locks; i++)
	{
		LeaseSlot  *s = &shared->leases[i];

		if (s->state == ETCD_LEASE_RENEWING && s->nusers == 0 &&
			s->idle_since < idle_before)
			to_revoking(s, now);
		if (s->state == ETCD_LEASE_FREE || s->state == ETCD_LEASE_GRANTING)
			continue;
		if (s->state == ETCD_LEASE_LOST && s->gone)
			continue;
		out[n].slot = i;
		out[n].state = s->state;
		out[n].lease_id = s->lease_id;
		out[n].ttl = s->ttl;
		out[n].expires_at = s->expires_at;
		out[n].next_due = s->next_due;
		n++;
	}
	LWLockRelease(shared->lock);
	return n;
}

/* A keepalive sent at sent_at was answered with a TTL. */
void
etcd_lease_renewed(int slot, int64 lease_id, TimestampTz sent_at, int ttl)
{
	LeaseSlot  *s = &shared->leases[slot];
	TimestampTz now = GetCurrentTimestamp();

	LWLockAcquire(shared->lock, LW_EXCLUSIVE);
	if (s->lease_id == lease_id && s->state == ETCD_LEASE_RENEWING)
	{
		TimestampTz expires = TimestampTzPlusMilliseconds(sent_at, (int64) ttl * 1000);

		if (expires > s->expires_at)
		{
			s->expires_at = expires;
			s->next_due = TimestampTzPlusMilliseconds(sent_at, (int64) ttl * 1000 / 3);
		}
	}
	shared->last_renewal = now;
	LWLockRelease(shared->lock);
}

/* Put off the worker's next request for a slot. */
void
etcd_lease_slot_defer(int slot, int64 lease_id, TimestampTz next_due)
{
	LeaseSlot  *s = &shared->leases[slot];

	LWLockAcquire(shared->lock, LW_EXCLUSIVE);
	if (s->lease_id == lease_id)
		s->next_due = next_due;
	LWLockRelease(shared->lock);
}

/*
 * RENEWING -> LOST, seen by the worker: etcd said the lease is gone, or it
 * could not be renewed before it expired.  Returns the number of locks lost,
 * or -1 when the lease was not being renewed any more.
 */
int
etcd_lease_declare_lost(int slot, int64 lease_id, bool gone)
{
	LeaseSlot  *s = &shared->leases[slot];
	Latch	   *owner = NULL;
	int			nlost = -1;

	LWLockAcquire(shared->lock, LW_EXCLUSIVE);
	if (s->lease_id == lease_id && s->state == ETCD_LEASE_RENEWING)
		owner = to_lost(s, slot, gone, &nlost);
	else if (s->lease_id == lease_id && gone)
		s->gone = true;
	LWLockRelease(shared->lock);
	if (nlost > 0)
		etcd_stat_add(ETCD_STAT_LOST, nlost);
	if (owner)
		SetLatch(owner);
	return nlost;
}

/*
 * A revoke failed: try again later, unless etcd has surely dropped the lease
 * by now, in which case the slot is done with.
 */
void
etcd_lease_revoke_failed(int slot, int64 lease_id, TimestampTz retry_at)
{
	LeaseSlot  *s = &shared->leases[slot];

	LWLockAcquire(shared->lock, LW_EXCLUSIVE);
	if (s->lease_id == lease_id &&
		(s->state == ETCD_LEASE_REVOKING || s->state == ETCD_LEASE_LOST))
	{
		TimestampTz until = s->state == ETCD_LEASE_LOST ?
		TimestampTzPlusMilliseconds(s->expires_at, (int64) s->ttl * 1000 + 1000) :
		s->revoke_until;

		if (GetCurrentTimestamp() >= until)
		{
			if (s->state == ETCD_LEASE_REVOKING)
				s->state = ETCD_LEASE_FREE;
			else
				s->gone = true;
		}
		else
			s->next_due = retry_at;
	}
	LWLockRelease(shared->lock);
}

/* ----------------------------------------------------------------
 * Lock slots, for the etcd_locks view
 * ----------------------------------------------------------------
 */

/* A new lock, waiting; -1 when the table is full. */
int
etcd_lock_slot_add(const char *name, const char *handle, int lease_slot,
				   int64 lease_id, int ttl, bool xact)
{
	int			i;

	LWLockAcquire(shared->lock, LW_EXCLUSIVE);
	for (i = 0; i < etcd_lock_max_locks; i++)
	{
		LockSlot   *s = &shared->locks[i];

		if (!s->used)
		{
			memset(&s->row, 0, sizeof(s->row));
			s->used = true;
			s->lease_slot = lease_slot;
			s->row.pid = MyProcPid;
			s->row.lease_id = lease_id;
			s->row.ttl = ttl;
			s->row.xact = xact;
			s->row.state = ETCD_LOCK_WAITING;
			strlcpy(s->row.name, name, sizeof(s->row.name));
			strlcpy(s->row.handle, handle, sizeof(s->row.handle));
			break;
		}
	}
	LWLockRelease(shared->lock);
	return i < etcd_lock_max_locks ? i : -1;
}

/* The lease and key of a lock slot added before its lease was known. */
void
etcd_lock_slot_attach(int slot, const char *handle, int lease_slot, int64 lease_id)
{
	LockSlot   *s = &shared->locks[slot];

	LWLockAcquire(shared->lock, LW_EXCLUSIVE);
	s->lease_slot = lease_slot;
	s->row.lease_id = lease_id;
	strlcpy(s->row.handle, handle, sizeof(s->row.handle));
	LWLockRelease(shared->lock);
}

void
etcd_lock_slot_update(int slot, EtcdLockState state, int session_count,
					  int xact_count, int64 token)
{
	LockSlot   *s = &shared->locks[slot];

	LWLockAcquire(shared->lock, LW_EXCLUSIVE);
	if (s->row.state == ETCD_LOCK_WAITING && state == ETCD_LOCK_HELD)
		s->row.acquired_at = GetCurrentTimestamp();
	s->row.state = state;
	s->row.session_count = session_count;
	s->row.xact_count = xact_count;
	s->row.fencing_token = token;
	LWLockRelease(shared->lock);
}

void
etcd_lock_slot_remove(int slot)
{
	LWLockAcquire(shared->lock, LW_EXCLUSIVE);
	shared->locks[slot].used = false;
	LWLockRelease(shared->lock);
}

/*
 * Copy every lock into rows[] (max_locks entries), with state LOST for
 * those whose lease is lost; returns how many.
 */
int
etcd_lock_rows(EtcdLockRow *rows)
{
	int			n = 0;
	int			nlost;
	int			i;

	LWLockAcquire(shared->lock, LW_EXCLUSIVE);
	nlost = expire_overdue();
	for (i = 0; i < etcd_lock_max_locks; i++)
	{
		LockSlot   *s = &shared->locks[i];
		LeaseSlot  *l;

		if (!s->used)
			continue;
		rows[n] = s->row;
		if (s->lease_slot >= 0)
		{
			l = &shared->leases[s->lease_slot];
			if (l->lease_id == s->row.lease_id && l->state == ETCD_LEASE_LOST)
				rows[n].state = ETCD_LOCK_LOST;
		}
		n++;
	}
	LWLockRelease(shared->lock);
	if (nlost > 0)
		etcd_stat_add(ETCD_STAT_LOST, nlost);
	return n;
}

/* The counters and gauges of etcd_lock_stats. */
void
etcd_stats_read(EtcdStatsView *v)
{
	int			nlost;
	int			i;

	memset(v, 0, sizeof(*v));
	LWLockAcquire(shared->lock, LW_EXCLUSIVE);
	nlost = expire_overdue();
	for (i = 0; i < etcd_lock_max_locks; i++)
	{
		LeaseSlot  *s = &shared->leases[i];

		if (s->state == ETCD_LEASE_RENEWING)
			v->leases++;
		else if (s->state == ETCD_LEASE_REVOKING ||
				 (s->state == ETCD_LEASE_LOST && !s->gone))
			v->revoking++;
		if (shared->locks[i].used)
			v->locks++;
	}
	v->worker_pid = shared->worker_pid;
	v->last_renewal = shared->last_renewal;
	LWLockRelease(shared->lock);
	if (nlost > 0)
		etcd_stat_add(ETCD_STAT_LOST, nlost);

	for (i = 0; i < ETCD_NSTATS; i++)
		v->counters[i] = pg_atomic_read_u64(&shared->stats[i]);
}
