/*-------------------------------------------------------------------------
 *
 * etcd_lock.h
 *		  Shared declarations for the etcd_lock extension: the etcd client,
 *		  the lock recipe, the shared-memory lease table and the lease worker.
 *
 * IDENTIFICATION
 *		  etcd_lock.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef ETCD_LOCK_H
#define ETCD_LOCK_H

#include <cjson/cJSON.h>

#include "datatype/timestamp.h"
#include "port/atomics.h"
#include "storage/latch.h"
#include "storage/lwlock.h"

/*
 * Longest lease TTL, in seconds.  etcd itself allows far more, but a lock
 * that outlives a crashed server by more than a day helps nobody.
 */
#define ETCD_LOCK_MAX_TTL		86400

/* Longest lock name, prefix and etcd key we keep in shared memory. */
#define ETCD_LOCK_NAME_MAX		256		/* bytes, including the NUL */
#define ETCD_LOCK_PREFIX_MAX	128		/* bytes, including the NUL */
#define ETCD_LOCK_KEY_MAX		(ETCD_LOCK_PREFIX_MAX + ETCD_LOCK_NAME_MAX + 20)

/*
 * SQLSTATE for "a lock this session held or waited for is gone in etcd".
 * Class 40 (transaction rollback), so that drivers and frameworks treat it
 * as a retryable concurrency failure.
 */
#define ERRCODE_ETCD_LOCK_LOST	MAKE_SQLSTATE('4','0','L','0','1')

/* GUC variables, in etcd_lock.c */
extern char *etcd_lock_endpoints;
extern int	etcd_lock_request_timeout;
extern int	etcd_lock_max_locks;
extern char *etcd_lock_prefix;
extern int	etcd_lock_default_ttl;
extern bool etcd_lock_commit_check;
extern char *etcd_lock_cacert;
extern char *etcd_lock_cert;
extern char *etcd_lock_key;
extern char *etcd_lock_user;
extern char *etcd_lock_password;
extern bool etcd_lock_loaded;

/* in client.c */

/* One response from etcd, or the reason there is none. */
typedef enum EtcdResultKind
{
	ETCD_RES_OK = 0,
	ETCD_RES_TRANSPORT,			/* no HTTP answer: refused, timed out, reset */
	ETCD_RES_PROTOCOL,			/* an answer that is not etcd's JSON */
	ETCD_RES_ERROR				/* etcd answered with an error */
} EtcdResultKind;

typedef struct EtcdResult
{
	EtcdResultKind kind;
	long		http_status;	/* 0 when no HTTP answer arrived */
	int			grpc_code;		/* etcd's "code", 0 when absent */
	cJSON	   *json;			/* parsed body, or NULL */
	char	   *error;			/* etcd's message or the transport error */
	char	   *endpoint;		/* endpoint that gave the last answer */
	int			curl_code;		/* curl's CURLcode, for transport errors */
	bool		timed_out;		/* no answer within the request's time limit */
	bool		auth_failed;	/* authenticating, not the request, failed */
} EtcdResult;

/* How one transfer ended, as seen by the multi driver. */
typedef struct EtcdTransfer EtcdTransfer;
typedef struct EtcdMulti EtcdMulti;

extern void etcd_client_init(void);
extern void etcd_endpoints_changed(void);
extern int	etcd_endpoint_count(void);
extern const char *etcd_endpoint(int i);
extern int	etcd_endpoint_order(int *order);
extern void etcd_endpoint_failed(int idx);
extern void etcd_endpoint_ok(int idx);
extern TimestampTz etcd_set_deadline(TimestampTz deadline);
extern long etcd_request_time_limit(void);
extern bool etcd_request(const char *path, cJSON *req, EtcdResult *res);
extern bool etcd_request_endpoint(int idx, const char *path, cJSON *req,
								  EtcdResult *res);
extern void etcd_auth_reset(void);
extern bool etcd_auth_wanted(void);
extern char *etcd_auth_body(void);
extern bool etcd_auth_accept(bool ok, EtcdResult *res);
extern void etcd_tls_changed(void);
extern int	etcd_tls_generation(void);
extern cJSON *etcd_call(const char *path, cJSON *req);
extern void etcd_report(int elevel, const char *path, EtcdResult *res);

/* What ended a wait on the watch stream. */
typedef enum EtcdWatchEvent
{
	ETCD_WATCH_NONE = 0,
	ETCD_WATCH_DELETED,			/* the watched key was deleted */
	ETCD_WATCH_ENDED,			/* stream ended or canceled: check again */
	ETCD_WATCH_WAKEUP,			/* latch set: look at shared state */
	ETCD_WATCH_TIMEOUT,			/* deadline passed */
	ETCD_WATCH_CREATED			/* etcd confirmed the watch */
} EtcdWatchEvent;

extern void etcd_watch_start(const char *key);
extern EtcdWatchEvent etcd_watch_wait(TimestampTz deadline);
extern void etcd_watch_stop(void);
extern int64 etcd_watch_revision(void);

/*
 * What a process waits for, shown in pg_stat_activity.wait_event: named
 * events on PostgreSQL 17 and later, plain "Extension" before.
 */
typedef enum EtcdWait
{
	ETCD_WAIT_LOCK,				/* EtcdLockWait: a lock held elsewhere */
	ETCD_WAIT_REQUEST,			/* EtcdRequest: an answer from etcd */
	ETCD_WAIT_WORKER,			/* EtcdLeaseWorker: the worker, idle or renewing */
	ETCD_NWAITS
} EtcdWait;

/* multi driver, shared by backends and the worker */
extern EtcdMulti *etcd_multi_create(void);
extern void etcd_multi_destroy(EtcdMulti *m);
extern EtcdTransfer *etcd_transfer_create(void);
extern void etcd_transfer_start(EtcdMulti *m, EtcdTransfer *t, const char *url,
								const char *body, long timeout_ms);
extern void etcd_transfer_stop(EtcdMulti *m, EtcdTransfer *t);
extern void etcd_transfer_set_auth(EtcdTransfer *t, bool with_auth);
extern bool etcd_transfer_done(EtcdTransfer *t);
extern bool etcd_transfer_result(EtcdTransfer *t, EtcdResult *res);
extern bool etcd_multi_wait(EtcdMulti *m, long max_wait_ms, EtcdWait what);

/* JSON and base64 helpers */
extern char *etcd_b64(const char *data, int len);
extern char *etcd_unb64(const char *b64, int *len);
extern bool etcd_json_get_int64(cJSON *obj, const char *field, int64 *out);
extern int64 etcd_json_int64(cJSON *obj, const char *field);
extern int64 etcd_json_need_int64(cJSON *obj, const char *field, const char *path);
extern cJSON *etcd_json_get(cJSON *obj, const char *path);
extern void etcd_json_add_int64(cJSON *obj, const char *field, int64 value);
extern void etcd_json_add_key(cJSON *obj, const char *field, const char *key);

/* in recipe.c: the etcd requests of the lock recipe */
typedef enum EtcdRecipeStatus
{
	ETCD_RECIPE_OWNED,			/* our key is the oldest: the lock is ours */
	ETCD_RECIPE_WAIT,			/* an older key is queued before ours */
	ETCD_RECIPE_LOST,			/* our key is gone */
	ETCD_RECIPE_NOLEASE			/* etcd has no such lease */
} EtcdRecipeStatus;

typedef enum EtcdReleaseStatus
{
	ETCD_RELEASE_DELETED,		/* our key, deleted */
	ETCD_RELEASE_GONE,			/* the key was no longer ours */
	ETCD_RELEASE_FAILED			/* etcd did not answer */
} EtcdReleaseStatus;

extern int64 etcd_lease_grant(int ttl, int *granted_ttl);
extern bool etcd_lease_revoke(int64 lease_id, int elevel);
extern EtcdRecipeStatus etcd_recipe_enqueue(const char *name, const char *mykey,
											int64 lease_id, int64 *myrev,
											char **pred, int64 *watch_from);
extern EtcdRecipeStatus etcd_recipe_check(const char *name, const char *mykey,
										  int64 myrev, char **pred,
										  int64 *watch_from);
extern EtcdReleaseStatus etcd_recipe_release(const char *mykey, int64 myrev,
											 int elevel);
extern bool etcd_key_delete(const char *mykey, int elevel);
extern int	etcd_recipe_verify(const char **keys, const int64 *revs, int n);

/* in locks.c: this backend's leases and locks */
extern char *etcd_lock_acquire(const char *name, int ttl, bool xact, long wait_ms);
extern bool etcd_lock_release(const char *handle);
extern int	etcd_lock_release_all(void);
extern void etcd_lock_check_lost(void);
extern void etcd_lock_check_doomed(void);
extern int64 etcd_lock_token(const char *handle);

/* in shmem.c: the shared tables and their lifecycle (see its header) */
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

extern void etcd_shmem_request(void);
extern void etcd_shmem_startup(void);
extern bool etcd_shmem_ready(void);
extern void etcd_stat_add_(EtcdStat which, uint64 n);
#define etcd_stat_add(which, n)	etcd_stat_add_((which), (n))
extern void etcd_wake_worker(void);

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

/* in worker.c */
extern void etcd_worker_register(void);
extern PGDLLEXPORT void etcd_lock_worker_main(Datum arg);

#endif							/* ETCD_LOCK_H */
