/*-------------------------------------------------------------------------
 *
 * shmem.c
 *		  The shared-memory lease and lock tables, and the statistics.
 *
 * Backends register their leases here for the worker to keep alive, and
 * their locks for the etcd_locks view.  The LWLock is only ever held for a
 * scan of the tables, never across a network request.
 *
 * IDENTIFICATION
 *		  shmem.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/shmem.h"
#include "utils/timestamp.h"

#include "etcd_lock.h"

EtcdLockShared *etcd_shared = NULL;


static Size
shmem_size(void)
{
	Size		size = MAXALIGN(sizeof(EtcdLockShared));

	size = add_size(size, mul_size(etcd_lock_max_locks, sizeof(EtcdLeaseSlot)));
	size = add_size(size, mul_size(etcd_lock_max_locks, sizeof(EtcdLockSlot)));
	return size;
}

void
etcd_shmem_request(void)
{
	RequestAddinShmemSpace(shmem_size());
	RequestNamedLWLockTranche("etcd_lock", 1);
}

void
etcd_shmem_startup(void)
{
	bool		found;

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	etcd_shared = ShmemInitStruct("etcd_lock", shmem_size(), &found);
	if (!found)
	{
		char	   *p = (char *) etcd_shared;

		memset(etcd_shared, 0, shmem_size());
		etcd_shared->lock = &(GetNamedLWLockTranche("etcd_lock"))->lock;
		pg_atomic_init_u64(&etcd_shared->stats.requests, 0);
		pg_atomic_init_u64(&etcd_shared->stats.keepalives, 0);
		pg_atomic_init_u64(&etcd_shared->stats.lease_grants, 0);
		pg_atomic_init_u64(&etcd_shared->stats.acquired, 0);
		pg_atomic_init_u64(&etcd_shared->stats.released, 0);
		pg_atomic_init_u64(&etcd_shared->stats.lost, 0);
		pg_atomic_init_u64(&etcd_shared->stats.failures, 0);
		p += MAXALIGN(sizeof(EtcdLockShared));
		etcd_shared->leases = (EtcdLeaseSlot *) p;
		p += mul_size(etcd_lock_max_locks, sizeof(EtcdLeaseSlot));
		etcd_shared->locks = (EtcdLockSlot *) p;
	}
	LWLockRelease(AddinShmemInitLock);
}

void
etcd_wake_worker(void)
{
	Latch	   *latch = etcd_shared->worker_latch;

	if (latch)
		SetLatch(latch);
}

static void
table_full(const char *what)
{
	ereport(ERROR,
			(errcode(ERRCODE_OUT_OF_MEMORY),
			 errmsg("too many etcd %s in use on this server", what),
			 errhint("Increase etcd_lock.max_locks.")));
}

int
etcd_lease_slot_reserve(void)
{
	int			i;

	LWLockAcquire(etcd_shared->lock, LW_EXCLUSIVE);
	for (i = 0; i < etcd_lock_max_locks; i++)
	{
		EtcdLeaseSlot *s = &etcd_shared->leases[i];

		if (s->lease_id == 0)
		{
			memset(s, 0, sizeof(EtcdLeaseSlot));
			s->lease_id = ETCD_LEASE_RESERVED;
			s->pid = MyProcPid;
			s->owner_latch = MyLatch;
			break;
		}
	}
	LWLockRelease(etcd_shared->lock);
	if (i == etcd_lock_max_locks)
		table_full("leases");
	return i;
}

/* Hand a granted lease to the worker: first keepalive due in ttl/3. */
void
etcd_lease_slot_fill(int slot, int64 lease_id, int ttl)
{
	EtcdLeaseSlot *s = &etcd_shared->leases[slot];
	TimestampTz now = GetCurrentTimestamp();

	LWLockAcquire(etcd_shared->lock, LW_EXCLUSIVE);
	s->ttl = ttl;
	s->revoke = false;
	s->last_renewed = now;
	s->next_keepalive = TimestampTzPlusMilliseconds(now, ttl * 1000L / 3);
	s->lease_id = lease_id;
	LWLockRelease(etcd_shared->lock);
	etcd_wake_worker();
}

void
etcd_lease_slot_release(int slot, int64 lease_id)
{
	LWLockAcquire(etcd_shared->lock, LW_EXCLUSIVE);
	/* only our own lease: the slot may have been handed over and reused */
	if (etcd_shared->leases[slot].lease_id == lease_id)
		etcd_shared->leases[slot].lease_id = 0;
	LWLockRelease(etcd_shared->lock);
}

bool
etcd_lease_slot_lost(int slot, int64 lease_id)
{
	bool		lost;

	LWLockAcquire(etcd_shared->lock, LW_SHARED);
	lost = etcd_shared->leases[slot].lease_id == lease_id &&
		etcd_shared->leases[slot].lost;
	LWLockRelease(etcd_shared->lock);
	return lost;
}

int
etcd_lock_slot_add(const char *name, const char *handle, int lease_slot,
				   int64 lease_id, int ttl, bool xact)
{
	int			i;

	LWLockAcquire(etcd_shared->lock, LW_EXCLUSIVE);
	for (i = 0; i < etcd_lock_max_locks; i++)
	{
		EtcdLockSlot *s = &etcd_shared->locks[i];

		if (s->state == ETCD_LOCK_FREE)
		{
			s->state = ETCD_LOCK_WAITING;
			s->pid = MyProcPid;
			s->lease_slot = lease_slot;
			s->lease_id = lease_id;
			s->ttl = ttl;
			s->session_count = 0;
			s->xact_count = 0;
			s->xact = xact;
			s->fencing_token = 0;
			s->acquired_at = 0;
			strlcpy(s->name, name, sizeof(s->name));
			strlcpy(s->handle, handle, sizeof(s->handle));
			break;
		}
	}
	LWLockRelease(etcd_shared->lock);
	if (i == etcd_lock_max_locks)
		table_full("locks");
	return i;
}

void
etcd_lock_slot_update(int slot, EtcdLockState state, int session_count,
					  int xact_count, int64 token)
{
	EtcdLockSlot *s = &etcd_shared->locks[slot];

	LWLockAcquire(etcd_shared->lock, LW_EXCLUSIVE);
	if (s->state == ETCD_LOCK_WAITING && state == ETCD_LOCK_HELD)
		s->acquired_at = GetCurrentTimestamp();
	s->state = state;
	s->session_count = session_count;
	s->xact_count = xact_count;
	s->fencing_token = token;
	LWLockRelease(etcd_shared->lock);
}

void
etcd_lock_slot_remove(int slot)
{
	LWLockAcquire(etcd_shared->lock, LW_EXCLUSIVE);
	etcd_shared->locks[slot].state = ETCD_LOCK_FREE;
	LWLockRelease(etcd_shared->lock);
}

/* Count the locks riding on a lease; the caller holds the LWLock. */
int
etcd_locks_on_lease(int64 lease_id)
{
	int			n = 0;
	int			i;

	for (i = 0; i < etcd_lock_max_locks; i++)
		if (etcd_shared->locks[i].state != ETCD_LOCK_FREE &&
			etcd_shared->locks[i].lease_id == lease_id)
			n++;
	return n;
}

/* A backend learned from etcd itself that its lease is gone. */
void
etcd_lease_slot_set_lost(int slot, int64 lease_id)
{
	EtcdLeaseSlot *s = &etcd_shared->leases[slot];
	int			n = 0;

	LWLockAcquire(etcd_shared->lock, LW_EXCLUSIVE);
	if (s->lease_id == lease_id && !s->lost)
	{
		s->lost = true;
		n = etcd_locks_on_lease(lease_id);
	}
	LWLockRelease(etcd_shared->lock);
	etcd_stat_add(lost, n);
}

/*
 * The owner no longer wants this lease: the worker stops renewing it, and
 * (now_due) revokes it, retrying until etcd would have expired it anyway.
 */
void
etcd_lease_slot_hand_over(int slot, int64 lease_id, bool now_due)
{
	EtcdLeaseSlot *s = &etcd_shared->leases[slot];
	TimestampTz now = GetCurrentTimestamp();

	LWLockAcquire(etcd_shared->lock, LW_EXCLUSIVE);
	if (s->lease_id == lease_id)
	{
		s->pid = 0;				/* no longer the backend's */
		s->owner_latch = NULL;
		s->revoke = true;
		/*
		 * Not due yet while the backend tries the revoke itself; due soon
		 * after, in case the backend never gets to it.
		 */
		s->next_keepalive = now_due ? now :
			TimestampTzPlusMilliseconds(now, 2L * etcd_lock_request_timeout + 1000);
		s->revoke_until = TimestampTzPlusMilliseconds(now, Max(10, 2 * s->ttl) * 1000L);
	}
	LWLockRelease(etcd_shared->lock);
	if (now_due)
		etcd_wake_worker();
}

/* Undo a hand-over whose revoke failed while the lease is still in use. */
void
etcd_lease_slot_reclaim(int slot, int64 lease_id)
{
	EtcdLeaseSlot *s = &etcd_shared->leases[slot];

	LWLockAcquire(etcd_shared->lock, LW_EXCLUSIVE);
	if (s->lease_id == lease_id)
	{
		s->pid = MyProcPid;
		s->owner_latch = MyLatch;
		s->revoke = false;
		s->next_keepalive = GetCurrentTimestamp();
	}
	LWLockRelease(etcd_shared->lock);
	etcd_wake_worker();
}

/* A backend is leaving: free every slot it had, whatever state it was in. */
void
etcd_shmem_forget_backend(void)
{
	int			i;

	LWLockAcquire(etcd_shared->lock, LW_EXCLUSIVE);
	for (i = 0; i < etcd_lock_max_locks; i++)
	{
		if (etcd_shared->leases[i].lease_id != 0 &&
			etcd_shared->leases[i].pid == MyProcPid)
			etcd_shared->leases[i].lease_id = 0;
		if (etcd_shared->locks[i].state != ETCD_LOCK_FREE &&
			etcd_shared->locks[i].pid == MyProcPid)
			etcd_shared->locks[i].state = ETCD_LOCK_FREE;
	}
	LWLockRelease(etcd_shared->lock);
}
