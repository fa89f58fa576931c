/*-------------------------------------------------------------------------
 *
 * shmem.h
 *		  The shared tables: lease slots renewed by the worker, lock slots
 *		  shown in the etcd_locks view, and the server-wide counters.
 *
 * The lifecycle of a lease slot, and who may move it, is drawn at the top
 * of shmem.c.  Only shmem.c takes the tables' LWLock.
 *
 * IDENTIFICATION
 *		  shmem.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef ETCD_LOCK_SHMEM_H
#define ETCD_LOCK_SHMEM_H

#include "datatype/timestamp.h"

/*
 * Longest lease TTL, in seconds.  etcd itself allows far more, but a lock
 * that outlives a crashed server by more than a day helps nobody.
 */
#define ETCD_LOCK_MAX_TTL		86400

/* Longest lock name, prefix and etcd key kept in the tables. */
#define ETCD_LOCK_NAME_MAX		256		/* bytes, including the NUL */
#define ETCD_LOCK_PREFIX_MAX	128		/* bytes, including the NUL */
#define ETCD_LOCK_KEY_MAX		(ETCD_LOCK_PREFIX_MAX + ETCD_LOCK_NAME_MAX + 20)

/* etcd_lock.max_locks: the size of both tables */
extern int	etcd_lock_max_locks;

typedef enum EtcdLeaseState
{
	ETCD_LEASE_FREE = 0,
	ETCD_LEASE_GRANTING,		/* reserved by a backend; grant under way */
	ETCD_LEASE_RENEWING,		/* the worker renews it for its owner */
	ETCD_LEASE_LOST,			/* not renewed any more; owner not told yet */
	ETCD_LEASE_REVOKING			/* no owner; revoked, then freed */
} EtcdLeaseState;

typedef enum EtcdLockState
{
	ETCD_LOCK_WAITING,
	ETCD_LOCK_HELD,
	ETCD_LOCK_LOST				/* in rows of the view only */
} EtcdLockState;

/* One row of the etcd_locks view. */
typedef struct EtcdLockRow
{
	EtcdLockState state;
	int			pid;
	int64		lease_id;
	int			ttl;
	int			session_count;
	int			xact_count;
	bool		xact;			/* asked for as a transaction lock */
	int64		fencing_token;
	TimestampTz acquired_at;
	char		name[ETCD_LOCK_NAME_MAX];
	char		handle[ETCD_LOCK_KEY_MAX];
} EtcdLockRow;

/* What the worker needs of one lease slot. */
typedef struct EtcdLeaseView
{
	int			slot;
	EtcdLeaseState state;		/* RENEWING, LOST or REVOKING */
	int64		lease_id;
	int			ttl;
	TimestampTz expires_at;
	TimestampTz next_due;
} EtcdLeaseView;

typedef enum EtcdStat
{
	ETCD_STAT_REQUESTS,
	ETCD_STAT_KEEPALIVES,
	ETCD_STAT_LEASE_GRANTS,
	ETCD_STAT_ACQUIRED,
	ETCD_STAT_RELEASED,
	ETCD_STAT_LOST,
	ETCD_STAT_FAILURES,
	ETCD_NSTATS
} EtcdStat;

typedef struct EtcdStatsView
{
	uint64		counters[ETCD_NSTATS];	/* indexed by EtcdStat */
	int			leases;			/* being renewed */
	int			revoking;		/* handed to the worker to revoke */
	int			locks;
	int			worker_pid;
	TimestampTz last_renewal;
} EtcdStatsView;

extern void etcd_shmem_define_settings(void);
extern void etcd_shmem_request(void);
extern void etcd_shmem_startup(void);
extern bool etcd_shmem_ready(void);
extern void etcd_stat_add(EtcdStat which, uint64 n);

/* the backend's side */
extern int	etcd_lease_slot_reserve(void);
extern void etcd_lease_slot_cancel(int slot);
extern void etcd_lease_slot_fill(int slot, int64 lease_id, int ttl,
								 TimestampTz sent_at);
extern bool etcd_lease_slot_set_users(int slot, int64 lease_id, int nusers);
extern EtcdLeaseState etcd_lease_slot_check(int slot, int64 lease_id);
extern void etcd_lease_slot_mark_gone(int slot, int64 lease_id);
extern void etcd_lease_slot_give_up(int slot, int64 lease_id, long grace_ms);
extern void etcd_lease_slot_revoked(int slot, int64 lease_id);
extern int	etcd_lease_slot_steal_idle(int64 *lease_id, long grace_ms);
extern void etcd_shmem_forget_backend(void);

/* the worker's side */
extern void etcd_worker_attach(void);
extern void etcd_worker_detach(void);
extern int	etcd_lease_table_snapshot(EtcdLeaseView *out);
extern void etcd_lease_renewed(int slot, int64 lease_id, TimestampTz sent_at, int ttl);
extern void etcd_lease_slot_defer(int slot, int64 lease_id, TimestampTz next_due);
extern int	etcd_lease_declare_lost(int slot, int64 lease_id, bool gone);
extern void etcd_lease_revoke_failed(int slot, int64 lease_id, TimestampTz retry_at);

/* lock slots and views */
extern int	etcd_lock_slot_add(const char *name, const char *handle, int lease_slot,
							   int64 lease_id, int ttl, bool xact);
extern void etcd_lock_slot_attach(int slot, const char *handle, int lease_slot,
								  int64 lease_id);
extern void etcd_lock_slot_update(int slot, EtcdLockState state, int session_count,
								  int xact_count, int64 token);
extern void etcd_lock_slot_remove(int slot);
extern int	etcd_lock_rows(EtcdLockRow *rows);
extern void etcd_stats_read(EtcdStatsView *v);

#endif							/* ETCD_LOCK_SHMEM_H */
