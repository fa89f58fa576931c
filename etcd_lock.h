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
	bool		auth_failed;	/* authenticating, not the request, failed */
} EtcdResult;

/* How one transfer ended, as seen by the multi driver. */
typedef struct EtcdTransfer EtcdTransfer;
typedef struct EtcdMulti EtcdMulti;

extern void etcd_client_init(void);
extern void etcd_endpoints_changed(void);
extern int	etcd_endpoint_count(void);
extern const char *etcd_endpoint(int i);
extern bool etcd_request(const char *path, cJSON *req, EtcdResult *res);
extern bool etcd_request_endpoint(int idx, const char *path, cJSON *req,
								  EtcdResult *res);
extern void etcd_auth_reset(void);
extern void etcd_tls_changed(void);
extern int	etcd_tls_generation(void);
extern void etcd_auth_ensure(void);
extern cJSON *etcd_call(const char *path, cJSON *req);
extern void etcd_report(int elevel, const char *path, EtcdResult *res);
extern void etcd_watch_start(const char *key);
extern int	etcd_watch_wait(TimestampTz deadline);
extern void etcd_watch_stop(void);
extern int64 etcd_watch_revision(void);

#define ETCD_WATCH_DELETED	1	/* the watched key was deleted */
#define ETCD_WATCH_ENDED	2	/* stream ended or canceled: check again */
#define ETCD_WATCH_WAKEUP	3	/* latch set: look at shared state */
#define ETCD_WATCH_TIMEOUT	4	/* deadline passed */
#define ETCD_WATCH_CREATED	5	/* etcd confirmed the watch */

/* multi driver, shared by backends and the worker */
extern EtcdMulti *etcd_multi_create(void);
extern void etcd_multi_destroy(EtcdMulti *m);
extern EtcdTransfer *etcd_transfer_create(void);
extern void etcd_transfer_start(EtcdMulti *m, EtcdTransfer *t, const char *url,
								const char *body, long timeout_ms);
extern void etcd_transfer_stop(EtcdMulti *m, EtcdTransfer *t);
extern bool etcd_transfer_done(EtcdTransfer *t);
extern bool etcd_transfer_result(EtcdTransfer *t, EtcdResult *res);
extern bool etcd_multi_wait(EtcdMulti *m, long max_wait_ms);

/* JSON and base64 helpers */
extern char *etcd_b64(const char *data, int len);
extern char *etcd_unb64(const char *b64, int *len);
extern int64 etcd_json_int64(cJSON *obj, const char *field);
extern cJSON *etcd_json_get(cJSON *obj, const char *path);
extern void etcd_json_add_int64(cJSON *obj, const char *field, int64 value);
extern void etcd_json_add_key(cJSON *obj, const char *field, const char *key);

/* in recipe.c */
extern int64 etcd_lease_grant(int ttl, int *granted_ttl);
extern bool etcd_lease_revoke(int64 lease_id, int elevel);
extern int	etcd_recipe_enqueue(const char *name, const char *mykey, int64 lease_id,
								int64 *myrev, char **pred, int64 *watch_from);
extern int	etcd_recipe_check(const char *name, const char *mykey, int64 myrev,
							  char **pred, int64 *watch_from);
extern int	etcd_recipe_release(const char *mykey, int64 myrev, int elevel);
extern bool etcd_key_delete(const char *mykey, int elevel);
extern int	etcd_recipe_verify(const char **keys, const int64 *revs, int n);

#define ETCD_RECIPE_OWNED	0
#define ETCD_RECIPE_WAIT	1
#define ETCD_RECIPE_LOST	2
#define ETCD_RECIPE_NOLEASE	3

#define ETCD_RELEASE_DELETED	0	/* our key, deleted */
#define ETCD_RELEASE_GONE		1	/* the key was no longer ours */
#define ETCD_RELEASE_FAILED		2	/* etcd did not answer */

extern char *etcd_lock_acquire(const char *name, int ttl, bool xact, long wait_ms);
extern bool etcd_lock_release(const char *handle);
extern int	etcd_lock_release_all(void);
extern void etcd_lock_check_lost(void);
extern void etcd_lock_check_doomed(void);
extern int64 etcd_lock_token(const char *handle);

/* in shmem.c */
typedef struct EtcdLockStats
{
	pg_atomic_uint64 requests;
	pg_atomic_uint64 keepalives;
	pg_atomic_uint64 lease_grants;
	pg_atomic_uint64 acquired;
	pg_atomic_uint64 released;
	pg_atomic_uint64 lost;
	pg_atomic_uint64 failures;
} EtcdLockStats;

/* a reserved lease slot, not yet granted; the worker skips ids <= 0 */
#define ETCD_LEASE_RESERVED	(-1)

/* A lease that the worker keeps alive for a backend. */
typedef struct EtcdLeaseSlot
{
	int64		lease_id;		/* 0 when the slot is free */
	int			ttl;			/* granted TTL, seconds */
	int			pid;			/* owning backend */
	Latch	   *owner_latch;	/* set when the lease is found lost */
	bool		lost;			/* etcd no longer has it */
	TimestampTz next_keepalive; /* written by the worker only, after start */
	TimestampTz last_renewed;
	bool		revoke;			/* handed to the worker to revoke */
	TimestampTz revoke_until;	/* give up then: etcd has expired it */
} EtcdLeaseSlot;

typedef enum EtcdLockState
{
	ETCD_LOCK_FREE = 0,
	ETCD_LOCK_WAITING,
	ETCD_LOCK_HELD
} EtcdLockState;

/* One lock held or waited for, for the etcd_locks view. */
typedef struct EtcdLockSlot
{
	EtcdLockState state;
	int			pid;
	int			lease_slot;
	int64		lease_id;
	int			ttl;
	int			session_count;
	int			xact_count;
	bool		xact;			/* asked for as a transaction lock */
	int64		fencing_token;
	TimestampTz acquired_at;
	char		name[ETCD_LOCK_NAME_MAX];
	char		handle[ETCD_LOCK_KEY_MAX];
} EtcdLockSlot;

typedef struct EtcdLockShared
{
	LWLock	   *lock;			/* protects the two slot arrays */
	Latch	   *worker_latch;	/* NULL until the worker runs */
	int			worker_pid;
	EtcdLockStats stats;
	EtcdLeaseSlot *leases;		/* etcd_lock_max_locks entries */
	EtcdLockSlot *locks;		/* etcd_lock_max_locks entries */
} EtcdLockShared;

extern EtcdLockShared *etcd_shared;

extern void etcd_shmem_request(void);
extern void etcd_shmem_startup(void);
extern int	etcd_lease_slot_reserve(void);
extern void etcd_lease_slot_fill(int slot, int64 lease_id, int ttl);
extern void etcd_lease_slot_release(int slot, int64 lease_id);
extern bool etcd_lease_slot_lost(int slot, int64 lease_id);
extern void etcd_lease_slot_set_lost(int slot, int64 lease_id);
extern void etcd_lease_slot_hand_over(int slot, int64 lease_id, bool now_due);
extern void etcd_lease_slot_reclaim(int slot, int64 lease_id);
extern int	etcd_locks_on_lease(int64 lease_id);
extern int	etcd_lock_slot_add(const char *name, const char *handle, int lease_slot,
							   int64 lease_id, int ttl, bool xact);
extern void etcd_lock_slot_update(int slot, EtcdLockState state, int session_count,
								  int xact_count, int64 token);
extern void etcd_lock_slot_remove(int slot);
extern void etcd_shmem_forget_backend(void);
extern void etcd_wake_worker(void);

#define etcd_stat_add(field, n) \
	do { if (etcd_shared) pg_atomic_fetch_add_u64(&etcd_shared->stats.field, (n)); } while (0)

/* in worker.c */
extern void etcd_worker_register(void);
extern PGDLLEXPORT void etcd_lock_worker_main(Datum arg);

#endif							/* ETCD_LOCK_H */
