/*-------------------------------------------------------------------------
 *
 * recipe.c
 *		  etcd's lock recipe (the layout of concurrency.Mutex and
 *		  `etcdctl lock`) and this backend's leases and locks.
 *
 * A lock on NAME is a key NAME/<lease id in hex> attached to a lease.  The
 * key with the smallest create_revision under NAME/ owns the lock; every
 * other waiter watches the key just before its own, so waiters are served
 * in FIFO order and a release wakes exactly one of them.
 *
 * IDENTIFICATION
 *		  recipe.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/proc.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"
#include "utils/timeout.h"
#include "utils/timestamp.h"

#include "etcd_lock.h"

/* ----------------------------------------------------------------
 * Requests of the recipe
 * ----------------------------------------------------------------
 */

/* The end of the range of keys that start with pfx. */
static char *
prefix_end(const char *pfx)
{
	char	   *end = pstrdup(pfx);
	int			i;

	for (i = strlen(end) - 1; i >= 0; i--)
	{
		if ((unsigned char) end[i] < 0xff)
		{
			end[i]++;
			end[i + 1] = '\0';
			return end;
		}
	}
	/* unreachable: every prefix we range over ends in '/' */
	elog(ERROR, "etcd key prefix has no range end");
	return NULL;
}

/* A range over NAME/, newest creation first, keys only. */
static cJSON *
waiters_range(const char *name, int64 max_create_revision, int limit)
{
	cJSON	   *range = cJSON_CreateObject();
	char	   *pfx = psprintf("%s/", name);

	etcd_json_add_key(range, "key", pfx);
	etcd_json_add_key(range, "range_end", prefix_end(pfx));
	cJSON_AddStringToObject(range, "sort_order", "DESCEND");
	cJSON_AddStringToObject(range, "sort_target", "CREATE");
	etcd_json_add_int64(range, "limit", limit);
	cJSON_AddBoolToObject(range, "keys_only", true);
	if (max_create_revision > 0)
		etcd_json_add_int64(range, "max_create_revision", max_create_revision);
	return range;
}

static cJSON *
create_compare(const char *key, int64 create_revision)
{
	cJSON	   *cmp = cJSON_CreateObject();

	etcd_json_add_key(cmp, "key", key);
	cJSON_AddStringToObject(cmp, "target", "CREATE");
	cJSON_AddStringToObject(cmp, "result", "EQUAL");
	etcd_json_add_int64(cmp, "create_revision", create_revision);
	return cmp;
}

static void
add_op(cJSON *array, const char *op, cJSON *body)
{
	cJSON	   *item = cJSON_CreateObject();

	cJSON_AddItemToObject(item, op, body);
	cJSON_AddItemToArray(array, item);
}

/* The key of kvs[i] in a range response, or NULL. */
static char *
range_key(cJSON *range_response, int i)
{
	cJSON	   *kv = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(range_response, "kvs"), i);
	cJSON	   *key = cJSON_GetObjectItemCaseSensitive(kv, "key");

	if (!cJSON_IsString(key))
		return NULL;
	return etcd_unb64(key->valuestring, NULL);
}

static cJSON *
txn_response(cJSON *txn, int i, const char *kind)
{
	return cJSON_GetObjectItemCaseSensitive(
		cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(txn, "responses"), i), kind);
}

int64
etcd_lease_grant(int ttl, int *granted_ttl)
{
	cJSON	   *req = cJSON_CreateObject();
	cJSON	   *resp;
	int64		id;

	etcd_json_add_int64(req, "TTL", ttl);
	resp = etcd_call("/v3/lease/grant", req);
	etcd_stat_add(lease_grants, 1);
	id = etcd_json_int64(resp, "ID");
	*granted_ttl = (int) etcd_json_int64(resp, "TTL");
	if (id <= 0 || *granted_ttl <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("etcd granted no usable lease"),
				 errcontext("etcd request %s", "/v3/lease/grant")));
	return id;
}

/* Revoking a lease deletes every key attached to it. */
bool
etcd_lease_revoke(int64 lease_id, bool nothrow)
{
	cJSON	   *req = cJSON_CreateObject();
	EtcdResult	res;

	etcd_json_add_int64(req, "ID", lease_id);
	if (etcd_request("/v3/lease/revoke", req, &res))
		return true;
	if (res.kind == ETCD_RES_ERROR && res.grpc_code == 5)
		return true;			/* already gone, and its keys with it */
	etcd_report(nothrow ? WARNING : ERROR, "/v3/lease/revoke", &res);
	return false;
}

/*
 * Create mykey unless it exists, and learn whether it is the oldest key
 * under NAME/.  In one txn: the put, then a range of the two newest keys,
 * which are ours and the one we queue behind (if any).
 */
int
etcd_recipe_enqueue(const char *name, const char *mykey, int64 lease_id,
					int64 *myrev, char **pred, int64 *watch_from)
{
	cJSON	   *txn = cJSON_CreateObject();
	cJSON	   *success;
	cJSON	   *failure;
	cJSON	   *put = cJSON_CreateObject();
	cJSON	   *range = cJSON_CreateObject();
	cJSON	   *resp;
	cJSON	   *compare = cJSON_AddArrayToObject(txn, "compare");

	cJSON_AddItemToArray(compare, create_compare(mykey, 0));
	success = cJSON_AddArrayToObject(txn, "success");
	etcd_json_add_key(put, "key", mykey);
	cJSON_AddStringToObject(put, "value", "");
	etcd_json_add_int64(put, "lease", lease_id);
	add_op(success, "request_put", put);
	add_op(success, "request_range", waiters_range(name, 0, 2));
	failure = cJSON_AddArrayToObject(txn, "failure");
	etcd_json_add_key(range, "key", mykey);
	add_op(failure, "request_range", range);

	resp = etcd_call("/v3/kv/txn", txn);

	if (!cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(resp, "succeeded")))
	{
		/*
		 * The key is there already: a retried request that had been applied,
		 * or a release that never reached etcd.  It is ours either way (the
		 * lease in its name is ours), so continue from its revision.
		 */
		cJSON	   *kv = cJSON_GetArrayItem(
			cJSON_GetObjectItemCaseSensitive(txn_response(resp, 0, "response_range"), "kvs"), 0);

		*myrev = etcd_json_int64(kv, "create_revision");
		return etcd_recipe_check(name, mykey, *myrev, pred, watch_from);
	}

	/* the put's revision is the txn's revision */
	*myrev = etcd_json_int64(cJSON_GetObjectItemCaseSensitive(resp, "header"), "revision");
	*pred = range_key(txn_response(resp, 1, "response_range"), 1);
	if (*pred == NULL)
		return ETCD_RECIPE_OWNED;
	*watch_from = *myrev + 1;
	return ETCD_RECIPE_WAIT;
}

/*
 * After a wake: is mykey (at myrev) still there, and is any older key left?
 * Checking that the key still exists matters: etcd 3.4's own lock service
 * can grant a lock whose lease died during the wait.
 */
int
etcd_recipe_check(const char *name, const char *mykey, int64 myrev,
				  char **pred, int64 *watch_from)
{
	cJSON	   *txn = cJSON_CreateObject();
	cJSON	   *compare = cJSON_AddArrayToObject(txn, "compare");
	cJSON	   *success = cJSON_AddArrayToObject(txn, "success");
	cJSON	   *resp;

	cJSON_AddItemToArray(compare, create_compare(mykey, myrev));
	add_op(success, "request_range", waiters_range(name, myrev - 1, 1));

	resp = etcd_call("/v3/kv/txn", txn);
	if (!cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(resp, "succeeded")))
		return ETCD_RECIPE_LOST;

	*pred = range_key(txn_response(resp, 0, "response_range"), 0);
	if (*pred == NULL)
		return ETCD_RECIPE_OWNED;
	*watch_from = etcd_json_int64(cJSON_GetObjectItemCaseSensitive(resp, "header"), "revision") + 1;
	return ETCD_RECIPE_WAIT;
}

/*
 * Delete mykey if it is still the key we created.  The guard keeps a stale
 * release from deleting a newer holder's key.  Returns whether it deleted.
 */
bool
etcd_recipe_release(const char *mykey, int64 myrev, bool nothrow)
{
	cJSON	   *txn = cJSON_CreateObject();
	cJSON	   *compare = cJSON_AddArrayToObject(txn, "compare");
	cJSON	   *success = cJSON_AddArrayToObject(txn, "success");
	cJSON	   *del = cJSON_CreateObject();
	EtcdResult	res;

	cJSON_AddItemToArray(compare, create_compare(mykey, myrev));
	etcd_json_add_key(del, "key", mykey);
	add_op(success, "request_delete_range", del);

	if (!etcd_request("/v3/kv/txn", txn, &res))
	{
		etcd_report(nothrow ? WARNING : ERROR, "/v3/kv/txn", &res);
		return false;
	}
	return cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(res.json, "succeeded"));
}

/* Delete a waiter key of ours whose revision we may not know. */
bool
etcd_key_delete(const char *mykey, bool nothrow)
{
	cJSON	   *req = cJSON_CreateObject();
	EtcdResult	res;

	etcd_json_add_key(req, "key", mykey);
	if (etcd_request("/v3/kv/deleterange", req, &res))
		return true;
	etcd_report(nothrow ? WARNING : ERROR, "/v3/kv/deleterange", &res);
	return false;
}

/* ----------------------------------------------------------------
 * This backend's leases and locks
 * ----------------------------------------------------------------
 */

/*
 * One lease per TTL in use.  A lease outlives its last lock, so that the next
 * lock costs no grant; it is revoked when the session ends, by
 * etcd_unlock_all(), or when a failed acquisition leaves it unused.
 */
typedef struct LocalLease
{
	int64		id;				/* 0: free entry */
	int			ttl;			/* TTL asked for */
	int			slot;			/* in the shared lease table */
	int			nlocks;			/* locks held or waited for on it */
	bool		lost;
} LocalLease;

typedef struct LocalLock
{
	char		etcd_name[ETCD_LOCK_KEY_MAX];	/* hash key: prefix + name */
	char		name[ETCD_LOCK_NAME_MAX];
	char		handle[ETCD_LOCK_KEY_MAX];
	int			lease;			/* index into leases[] */
	int64		revision;		/* create_revision: the fencing token */
	int			session_count;
	int			xact_count;
	int			slot;			/* in the shared lock table */
	bool		lost;
} LocalLock;

static LocalLease *leases = NULL;
static int	nleases = 0;
static HTAB *local_locks = NULL;
static bool exit_callback_set = false;

static void etcd_lock_exit(int code, Datum arg);

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
	leases = MemoryContextAllocZero(TopMemoryContext, sizeof(LocalLease) * 4);
	nleases = 4;
	if (!exit_callback_set)
	{
		before_shmem_exit(etcd_lock_exit, (Datum) 0);
		exit_callback_set = true;
	}
}

static void
lease_forget(int i)
{
	etcd_lease_slot_release(leases[i].slot);
	leases[i].id = 0;
}

/* This backend's lease for ttl, granted now if there is none. */
static int
lease_for_ttl(int ttl)
{
	int			i;
	int			free_i = -1;
	int			slot;
	int			granted;
	int64		id;

	for (i = 0; i < nleases; i++)
	{
		if (leases[i].id == 0)
		{
			if (free_i < 0)
				free_i = i;
			continue;
		}
		if (leases[i].ttl == ttl && !leases[i].lost &&
			!etcd_lease_slot_lost(leases[i].slot, leases[i].id))
			return i;
	}
	if (free_i < 0)
	{
		leases = repalloc(leases, sizeof(LocalLease) * nleases * 2);
		memset(leases + nleases, 0, sizeof(LocalLease) * nleases);
		free_i = nleases;
		nleases *= 2;
	}

	/* take the shared slot first, so a full table costs no etcd request */
	slot = etcd_lease_slot_reserve();
	PG_TRY();
	{
		id = etcd_lease_grant(ttl, &granted);
	}
	PG_CATCH();
	{
		etcd_lease_slot_release(slot);
		PG_RE_THROW();
	}
	PG_END_TRY();
	etcd_lease_slot_fill(slot, id, granted);

	leases[free_i].id = id;
	leases[free_i].ttl = ttl;
	leases[free_i].slot = slot;
	leases[free_i].nlocks = 0;
	leases[free_i].lost = false;
	return free_i;
}

/* Drop a lock from local and shared state; no etcd request. */
static void
lock_forget(LocalLock *lock)
{
	LocalLease *lease = &leases[lock->lease];

	etcd_lock_slot_remove(lock->slot);
	lease->nlocks--;
	if (lease->lost && lease->nlocks == 0)
		lease_forget(lock->lease);
	hash_search(local_locks, lock->etcd_name, HASH_REMOVE, NULL);
}

/*
 * Warn once about each lock whose lease the worker found gone.  Every entry
 * point calls this, so a lost lock is never lost silently.
 */
void
etcd_lock_check_lost(void)
{
	HASH_SEQ_STATUS seq;
	LocalLock  *lock;
	bool		any = false;
	int			i;

	if (local_locks == NULL)
		return;
	for (i = 0; i < nleases; i++)
	{
		if (leases[i].id != 0 && !leases[i].lost &&
			etcd_lease_slot_lost(leases[i].slot, leases[i].id))
		{
			leases[i].lost = true;
			any = true;
			if (leases[i].nlocks == 0)
				lease_forget(i);
		}
	}
	if (!any)
		return;

	hash_seq_init(&seq, local_locks);
	while ((lock = hash_seq_search(&seq)) != NULL)
	{
		if (lock->lost || !leases[lock->lease].lost)
			continue;
		lock->lost = true;
		ereport(WARNING,
				(errcode(ERRCODE_ETCD_LOCK_LOST),
				 errmsg("etcd lock \"%s\" was lost", lock->name),
				 errdetail("Its lease %llx expired or was revoked in etcd, which deleted the key %s.",
						   (unsigned long long) leases[lock->lease].id, lock->handle)));
	}
}

/*
 * Give up a wait: delete the waiter key, or, after an error, revoke the lease
 * when nothing else uses it, so no lease is renewed for an abandoned wait.
 * Never throws: it runs in error paths.
 */
static void
abandon_wait(int lease_i, const char *mykey, int slot, bool after_error)
{
	LocalLease *lease = &leases[lease_i];

	etcd_lock_slot_remove(slot);
	lease->nlocks--;
	if (after_error && lease->nlocks == 0)
	{
		int64		id = lease->id;

		lease_forget(lease_i);
		etcd_lease_revoke(id, true);
	}
	else if (!etcd_key_delete(mykey, true))
	{
		/*
		 * A waiter key left in etcd would block everyone queued behind it
		 * for as long as the lease lives, so stop renewing that lease.
		 */
		lease->lost = true;
		if (lease->nlocks == 0)
			lease_forget(lease_i);
	}
}

/*
 * Take the lock NAME (prefix added), waiting at most wait_ms (-1: forever).
 * Returns the handle, or NULL when the wait ran out.
 */
char *
etcd_lock_acquire(const char *name, int ttl, bool xact, long wait_ms)
{
	char	   *etcd_name = psprintf("%s%s", etcd_lock_prefix, name);
	LocalLock  *lock;
	bool		found;
	int			lease_i;
	int64		lease_id;
	char	   *handle;
	int			slot;
	int			status = ETCD_RECIPE_WAIT;
	int64		myrev = 0;
	char	   *pred = NULL;
	int64		watch_from = 0;
	TimestampTz deadline = 0;

	local_init();
	etcd_lock_check_lost();

	/* reentrant: a session never waits for itself */
	lock = hash_search(local_locks, etcd_name, HASH_FIND, NULL);
	if (lock != NULL && lock->lost)
	{
		lock_forget(lock);		/* already reported by check_lost */
		lock = NULL;
	}
	if (lock != NULL)
	{
		if (xact)
			lock->xact_count++;
		else
			lock->session_count++;
		etcd_lock_slot_update(lock->slot, ETCD_LOCK_HELD, lock->session_count,
							  lock->xact_count, lock->revision);
		return pstrdup(lock->handle);
	}

	lease_i = lease_for_ttl(ttl);
	lease_id = leases[lease_i].id;
	/* etcd's layout: NAME/ + the lease ID in lower-case hex, unpadded */
	handle = psprintf("%s/%llx", etcd_name, (unsigned long long) lease_id);
	slot = etcd_lock_slot_add(name, handle, leases[lease_i].slot, lease_id, ttl);
	leases[lease_i].nlocks++;

	if (wait_ms > 0)
		deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), wait_ms);

	PG_TRY();
	{
		/* lock_timeout bounds the whole acquisition, as for a table lock */
		if (LockTimeout > 0)
			enable_timeout_after(LOCK_TIMEOUT, LockTimeout);

		status = etcd_recipe_enqueue(etcd_name, handle, lease_id, &myrev,
									 &pred, &watch_from);
		while (status == ETCD_RECIPE_WAIT && wait_ms != 0)
		{
			int			r;

			etcd_watch_start(pred, watch_from);
			do
			{
				r = etcd_watch_wait(deadline);
				if (etcd_lease_slot_lost(leases[lease_i].slot, lease_id))
					ereport(ERROR,
							(errcode(ERRCODE_ETCD_LOCK_LOST),
							 errmsg("etcd lock \"%s\" was lost while waiting", name),
							 errdetail("Its lease %llx expired or was revoked in etcd.",
									   (unsigned long long) lease_id)));
			} while (r == ETCD_WATCH_WAKEUP);
			etcd_watch_stop();
			if (r == ETCD_WATCH_TIMEOUT)
				break;

			status = etcd_recipe_check(etcd_name, handle, myrev, &pred, &watch_from);
			if (status == ETCD_RECIPE_LOST)
				ereport(ERROR,
						(errcode(ERRCODE_ETCD_LOCK_LOST),
						 errmsg("etcd lock \"%s\" was lost while waiting", name),
						 errdetail("Its key %s is gone from etcd, most likely because its lease expired.",
								   handle)));
		}
		if (LockTimeout > 0)
			disable_timeout(LOCK_TIMEOUT, false);
	}
	PG_CATCH();
	{
		HOLD_INTERRUPTS();
		if (LockTimeout > 0)
			disable_timeout(LOCK_TIMEOUT, true);
		etcd_watch_stop();
		abandon_wait(lease_i, handle, slot, true);
		RESUME_INTERRUPTS();
		PG_RE_THROW();
	}
	PG_END_TRY();

	if (status != ETCD_RECIPE_OWNED)
	{
		abandon_wait(lease_i, handle, slot, false);
		return NULL;
	}

	lock = hash_search(local_locks, etcd_name, HASH_ENTER, &found);
	strlcpy(lock->name, name, sizeof(lock->name));
	strlcpy(lock->handle, handle, sizeof(lock->handle));
	lock->lease = lease_i;
	lock->revision = myrev;
	lock->session_count = xact ? 0 : 1;
	lock->xact_count = xact ? 1 : 0;
	lock->slot = slot;
	lock->lost = false;
	etcd_lock_slot_update(slot, ETCD_LOCK_HELD, lock->session_count,
						  lock->xact_count, myrev);
	etcd_stat_add(acquired, 1);
	return handle;
}

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

/* Release one hold of a session lock; the last one deletes the key. */
bool
etcd_lock_release(const char *handle)
{
	LocalLock  *lock;
	bool		deleted;

	etcd_lock_check_lost();
	lock = lock_by_handle(handle);
	if (lock == NULL || lock->session_count == 0)
	{
		ereport(WARNING,
				(errcode(ERRCODE_LOCK_NOT_AVAILABLE),
				 errmsg("you don't own a session-level etcd lock with handle \"%s\"", handle)));
		return false;
	}
	if (lock->lost)
	{
		/* already reported when it was found lost */
		if (--lock->session_count + lock->xact_count == 0)
			lock_forget(lock);
		return false;
	}
	if (lock->session_count + lock->xact_count > 1)
	{
		lock->session_count--;
		etcd_lock_slot_update(lock->slot, ETCD_LOCK_HELD, lock->session_count,
							  lock->xact_count, lock->revision);
		return true;
	}

	/* an ERROR here leaves the lock held, as it still is in etcd */
	deleted = etcd_recipe_release(lock->handle, lock->revision, false);
	etcd_stat_add(released, 1);
	if (!deleted)
		ereport(WARNING,
				(errcode(ERRCODE_ETCD_LOCK_LOST),
				 errmsg("etcd lock \"%s\" was lost before it was released", lock->name),
				 errdetail("Its key %s was no longer in etcd.", lock->handle)));
	lock_forget(lock);
	return deleted;
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
	int			released = 0;
	int			i;

	etcd_lock_check_lost();
	if (local_locks == NULL)
		return 0;

	going = palloc0(sizeof(int) * nleases);
	hash_seq_init(&seq, local_locks);
	while ((lock = hash_seq_search(&seq)) != NULL)
		if (lock->session_count > 0 && lock->xact_count == 0)
			going[lock->lease]++;

	for (i = 0; i < nleases; i++)
	{
		if (leases[i].id != 0 && !leases[i].lost && going[i] == leases[i].nlocks)
		{
			etcd_lease_revoke(leases[i].id, false);
			leases[i].lost = true;	/* gone: forget it with its last lock */
		}
	}

	hash_seq_init(&seq, local_locks);
	while ((lock = hash_seq_search(&seq)) != NULL)
	{
		if (lock->session_count == 0)
			continue;
		if (lock->xact_count > 0)
		{
			lock->session_count = 0;
			etcd_lock_slot_update(lock->slot, ETCD_LOCK_HELD, 0,
								  lock->xact_count, lock->revision);
			continue;
		}
		if (!lock->lost && !leases[lock->lease].lost)
			etcd_recipe_release(lock->handle, lock->revision, false);
		if (!lock->lost)
		{
			released++;
			etcd_stat_add(released, 1);
		}
		lock_forget(lock);
	}
	/* leases left with no lock are not renewed for nothing */
	for (i = 0; i < nleases; i++)
		if (leases[i].id != 0 && leases[i].lost && leases[i].nlocks == 0)
			lease_forget(i);
	return released;
}

/*
 * Session end, normal or by pg_terminate_backend: revoke every lease, which
 * deletes every key of this session, held or waiting.  On a crash nothing
 * runs, and etcd frees the locks when the leases expire.
 */
static void
etcd_lock_exit(int code, Datum arg)
{
	HASH_SEQ_STATUS seq;
	LocalLock  *lock;
	int			i;

	HOLD_INTERRUPTS();
	etcd_watch_stop();
	for (i = 0; i < nleases; i++)
	{
		if (leases[i].id == 0)
			continue;
		if (!leases[i].lost)
			etcd_lease_revoke(leases[i].id, true);
		lease_forget(i);
	}
	if (local_locks)
	{
		hash_seq_init(&seq, local_locks);
		while ((lock = hash_seq_search(&seq)) != NULL)
		{
			if (!lock->lost)
				etcd_stat_add(released, 1);
			etcd_lock_slot_remove(lock->slot);
		}
	}
	RESUME_INTERRUPTS();
}
