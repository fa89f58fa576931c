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

#include "access/xact.h"
#include "access/xlog.h"
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
etcd_lease_revoke(int64 lease_id, int elevel)
{
	cJSON	   *req = cJSON_CreateObject();
	EtcdResult	res;

	etcd_json_add_int64(req, "ID", lease_id);
	if (etcd_request("/v3/lease/revoke", req, &res))
		return true;
	if (res.kind == ETCD_RES_ERROR && res.grpc_code == 5)
		return true;			/* already gone, and its keys with it */
	etcd_report(elevel, "/v3/lease/revoke", &res);
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
	EtcdResult	res;

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

	if (!etcd_request("/v3/kv/txn", txn, &res))
	{
		if (res.kind == ETCD_RES_ERROR && res.grpc_code == 5)
			return ETCD_RECIPE_NOLEASE; /* "requested lease not found" */
		etcd_report(ERROR, "/v3/kv/txn", &res);
	}
	resp = res.json;

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
 * release from deleting a newer holder's key.  A failed request is reported
 * at elevel.
 */
int
etcd_recipe_release(const char *mykey, int64 myrev, int elevel)
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
		etcd_report(elevel, "/v3/kv/txn", &res);
		return ETCD_RELEASE_FAILED;
	}
	if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(res.json, "succeeded")))
		return ETCD_RELEASE_DELETED;
	return ETCD_RELEASE_GONE;
}

/* Delete a waiter key of ours whose revision we may not know. */
bool
etcd_key_delete(const char *mykey, int elevel)
{
	cJSON	   *req = cJSON_CreateObject();
	EtcdResult	res;

	etcd_json_add_key(req, "key", mykey);
	if (etcd_request("/v3/kv/deleterange", req, &res))
		return true;
	etcd_report(elevel, "/v3/kv/deleterange", &res);
	return false;
}

/*
 * Confirm that every key still exists with the create_revision we hold, in
 * one txn.  Returns -1 when all do, else the index of a key that does not.
 */
int
etcd_recipe_verify(const char **keys, const int64 *revs, int n)
{
	cJSON	   *txn = cJSON_CreateObject();
	cJSON	   *compare = cJSON_AddArrayToObject(txn, "compare");
	cJSON	   *failure = cJSON_AddArrayToObject(txn, "failure");
	cJSON	   *resp;
	int			i;

	for (i = 0; i < n; i++)
	{
		cJSON	   *range = cJSON_CreateObject();

		cJSON_AddItemToArray(compare, create_compare(keys[i], revs[i]));
		etcd_json_add_key(range, "key", keys[i]);
		cJSON_AddBoolToObject(range, "keys_only", true);
		add_op(failure, "request_range", range);
	}
	resp = etcd_call("/v3/kv/txn", txn);
	if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(resp, "succeeded")))
		return -1;

	/* a missing key has create_revision 0, which compares unequal */
	for (i = 0; i < n; i++)
	{
		cJSON	   *kv = cJSON_GetArrayItem(
			cJSON_GetObjectItemCaseSensitive(txn_response(resp, i, "response_range"), "kvs"), 0);

		if (etcd_json_int64(kv, "create_revision") != revs[i])
			return i;
	}
	return 0;					/* the compare failed; blame the first */
}

/* ----------------------------------------------------------------
 * This backend's leases and locks
 * ----------------------------------------------------------------
 */

/*
 * One lease per TTL in use.  A lease outlives its last lock, so that the next
 * lock costs no grant; it is revoked when the session ends, by
 * etcd_unlock_all(), or when an acquisition that did not end in a lock
 * (error, cancel, or a try that ran out) leaves it unused.
 */
typedef struct LocalLease
{
	int64		id;				/* 0: free entry */
	int			ttl;			/* TTL asked for */
	int			slot;			/* in the shared lease table */
	int			nlocks;			/* locks held or waited for on it */
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

/* Keys whose release failed; retried at the next call, revoked at exit. */
typedef struct PendingRelease
{
	char		handle[ETCD_LOCK_KEY_MAX];
	int64		revision;
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

/*
 * Set when a release at transaction end or exit found etcd unreachable:
 * the other releases of that same callback are deferred without trying, so
 * COMMIT is not held up for one request timeout per lock.
 */
static bool callback_unreachable = false;

static void etcd_lock_exit(int code, Datum arg);
static void etcd_lock_xact_callback(XactEvent event, void *arg);
static void etcd_lock_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
									   SubTransactionId parentSubid, void *arg);

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

static void
lease_forget(int i)
{
	etcd_lease_slot_release(leases[i].slot, leases[i].id);
	leases[i].id = 0;
}

/*
 * Revoke a lease we no longer need, and forget it.  If etcd does not answer,
 * the worker takes the revoke over and retries it: a request that timed out
 * may still be applied when etcd recovers, and the key it creates must not
 * stay until the lease expires.  Returns whether the revoke went through;
 * without try_now the worker does it all.
 */
static bool
lease_drop(int i, bool try_now)
{
	int64		id = leases[i].id;
	int			slot = leases[i].slot;

	leases[i].id = 0;
	/* stop renewal first: a keepalive racing the revoke would report a loss */
	etcd_lease_slot_hand_over(slot, id, false);
	if (try_now && etcd_lease_revoke(id, WARNING))
	{
		etcd_lease_slot_release(slot, id);
		return true;
	}
	etcd_lease_slot_hand_over(slot, id, true);
	return false;
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
		etcd_lease_slot_release(slot, ETCD_LEASE_RESERVED);
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
	if (lock->xact_count > 0)
		xact_locks--;
	lease->nlocks--;
	if (lease->lost && lease->nlocks == 0)
		lease_forget(lock->lease);
	hash_search(local_locks, lock->etcd_name, HASH_REMOVE, NULL);
}

/*
 * A key we no longer want could not be deleted (etcd unreachable).  It must
 * not outlive our interest in it, or it would block everyone queued behind
 * it: retry it at the next call, and if its lease carries nothing else,
 * stop renewing the lease so etcd drops the key when the lease expires.
 */
static void
defer_release(int lease_i, const char *handle, int64 revision)
{
	LocalLease *lease = &leases[lease_i];

	if (lease->nlocks == 0 && !lease->lost)
	{
		int64		id = lease->id;

		/* nothing else rides on the lease: the worker revokes it, and the key */
		lease->lost = true;
		lease->id = 0;
		etcd_lease_slot_hand_over(lease->slot, id, true);
		ereport(WARNING,
				(errmsg("etcd key %s could not be deleted", handle),
				 errdetail("It goes when its lease is revoked, or expires within %d seconds.",
						   lease->ttl)));
		return;
	}
	if (npending == npending_max)
	{
		pending = repalloc(pending, sizeof(PendingRelease) * npending_max * 2);
		npending_max *= 2;
	}
	strlcpy(pending[npending].handle, handle, sizeof(pending[npending].handle));
	pending[npending].revision = revision;
	pending[npending].lease = lease_i;
	npending++;
	lease->nlocks++;			/* the lease must stay until the key is gone */
	ereport(WARNING,
			(errmsg("etcd key %s could not be deleted", handle),
			 errdetail("It will be deleted at the next call, or when this session ends.")));
}

/* Retry deferred releases; quiet while etcd is still unreachable. */
static void
flush_pending(void)
{
	int			i = 0;

	while (i < npending)
	{
		PendingRelease *p = &pending[i];
		LocalLease *lease = &leases[p->lease];

		/*
		 * A waiter key's revision may be unknown (its enqueue was cut off):
		 * delete it unguarded, which is safe because the key's name carries
		 * our lease, so only we ever create it.
		 */
		if (!lease->lost &&
			(p->revision != 0 ?
			 etcd_recipe_release(p->handle, p->revision, DEBUG1) == ETCD_RELEASE_FAILED :
			 !etcd_key_delete(p->handle, DEBUG1)))
		{
			i++;
			continue;
		}
		/* released now, or gone with its lease */
		lease->nlocks--;
		if (lease->lost && lease->nlocks == 0)
			lease_forget(p->lease);
		pending[i] = pending[--npending];
	}
}

/* A key we hold again must not be deleted by an older deferred release. */
static void
drop_pending(const char *handle)
{
	int			i;

	for (i = 0; i < npending; i++)
	{
		if (strcmp(pending[i].handle, handle) == 0)
		{
			leases[pending[i].lease].nlocks--;
			pending[i] = pending[--npending];
			return;
		}
	}
}

/*
 * Release a lock's key and forget the lock.  elevel ERROR is for SQL calls:
 * the lock stays held if etcd cannot be reached.  Anything lower is for
 * transaction end and error paths, where the release is deferred instead.
 * Returns whether the key was ours to delete (false: it was lost).
 */
static bool
release_key(LocalLock *lock, int elevel)
{
	int			lease_i = lock->lease;
	char		handle[ETCD_LOCK_KEY_MAX];
	int64		revision = lock->revision;
	int			r;

	strlcpy(handle, lock->handle, sizeof(handle));
	if (lock->lost)
		r = ETCD_RELEASE_GONE;	/* reported when found lost */
	else if (leases[lease_i].lost)
		r = ETCD_RELEASE_DELETED;	/* we revoked the lease, and the key */
	else if (elevel < ERROR && callback_unreachable)
		r = ETCD_RELEASE_FAILED;	/* etcd just failed us: defer at once */
	else
	{
		r = etcd_recipe_release(handle, revision, elevel);
		if (r == ETCD_RELEASE_FAILED)
			callback_unreachable = true;
	}
	if (!lock->lost)
		etcd_stat_add(released, 1);
	if (r == ETCD_RELEASE_GONE && !lock->lost)
		etcd_stat_add(lost, 1);
	lock_forget(lock);
	if (r == ETCD_RELEASE_FAILED)
		defer_release(lease_i, handle, revision);
	return r == ETCD_RELEASE_DELETED;
}

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
					 errdetail("Its key %s is gone from etcd, or its lease could not be renewed in time.",
							   lock->handle),
					 errhint("The transaction cannot commit; retry it.")));
		}
	}
}

/*
 * Report locks whose lease the worker found gone.  Every entry point calls
 * this, so a lost lock is never lost silently: a lost session lock gets a
 * WARNING once, and a lost transaction lock dooms its transaction.  Also
 * retries deferred releases.
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
	if (npending > 0)
		flush_pending();
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
	if (any)
	{
		hash_seq_init(&seq, local_locks);
		while ((lock = hash_seq_search(&seq)) != NULL)
		{
			if (lock->lost || !leases[lock->lease].lost)
				continue;
			lock->lost = true;
			if (lock->xact_count > 0)
				continue;		/* raise_if_doomed() reports it */
			ereport(WARNING,
					(errcode(ERRCODE_ETCD_LOCK_LOST),
					 errmsg("etcd lock \"%s\" was lost", lock->name),
					 errdetail("Its lease %llx expired, was revoked, or could not be renewed in time, so etcd no longer keeps the key %s.",
							   (unsigned long long) leases[lock->lease].id, lock->handle)));
		}
	}
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
			etcd_lease_slot_lost(leases[i].slot, leases[i].id))
		{
			etcd_lock_check_lost();
			return;
		}
	}
	raise_if_doomed();
}

/*
 * Give up a wait: revoke the lease when nothing else uses it, so that no
 * lease is renewed for an abandoned wait (that deletes the waiter key too),
 * or else delete the waiter key.  Never throws: it runs in error paths.
 */
static void
abandon_wait(int lease_i, const char *mykey, int slot)
{
	LocalLease *lease = &leases[lease_i];

	etcd_lock_slot_remove(slot);
	lease->nlocks--;
	if (lease->nlocks == 0)
		lease_drop(lease_i, true);
	else if (!etcd_key_delete(mykey, WARNING))
		defer_release(lease_i, mykey, 0);
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
 * not end in OWNED leaves no key behind.
 */
static int
enqueue_and_wait(const char *etcd_name, const char *name, int lease_i,
				 const char *handle, int slot, long wait_ms, int64 *myrev)
{
	int64		lease_id = leases[lease_i].id;
	int			status = ETCD_RECIPE_WAIT;
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
		while (status == ETCD_RECIPE_WAIT && wait_ms != 0)
		{
			int64		seen_at = watch_from - 1;	/* pred existed then */
			bool		checked = false;
			char	   *newpred = NULL;
			int			r;

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
				if (etcd_lease_slot_lost(leases[lease_i].slot, lease_id))
					ereport(ERROR,
							(errcode(ERRCODE_ETCD_LOCK_LOST),
							 errmsg("etcd lock \"%s\" was lost while waiting", name),
							 errdetail("Its lease %llx expired or was revoked in etcd.",
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
						 errdetail("Its key %s is gone from etcd, most likely because its lease expired.",
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
		abandon_wait(lease_i, handle, slot);
		RESUME_INTERRUPTS();
		PG_RE_THROW();
	}
	PG_END_TRY();

	if (status == ETCD_RECIPE_WAIT)
		abandon_wait(lease_i, handle, slot);
	return status;
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
	int			status;
	int			attempt;
	int64		myrev = 0;

	local_init();
	etcd_lock_check_lost();

	/* reentrant, and stacking session and transaction holds: one key */
	lock = hash_search(local_locks, etcd_name, HASH_FIND, NULL);
	if (lock != NULL && lock->lost)
	{
		lock_forget(lock);		/* already reported by check_lost */
		lock = NULL;
	}
	if (lock != NULL)
	{
		add_hold(lock, xact);
		etcd_lock_slot_update(lock->slot, ETCD_LOCK_HELD, lock->session_count,
							  lock->xact_count, lock->revision);
		return pstrdup(lock->handle);
	}

	for (attempt = 1;; attempt++)
	{
		lease_i = lease_for_ttl(ttl);
		lease_id = leases[lease_i].id;
		/* etcd's layout: NAME/ + the lease ID in lower-case hex, unpadded */
		handle = psprintf("%s/%llx", etcd_name, (unsigned long long) lease_id);
		slot = etcd_lock_slot_add(name, handle, leases[lease_i].slot, lease_id,
								  ttl, xact);
		leases[lease_i].nlocks++;

		status = enqueue_and_wait(etcd_name, name, lease_i, handle, slot,
								  wait_ms, &myrev);
		if (status != ETCD_RECIPE_NOLEASE)
			break;

		/*
		 * etcd dropped the lease before the worker noticed (revoked from
		 * outside).  Report the locks that rode on it, then take a new one.
		 */
		etcd_lock_slot_remove(slot);
		leases[lease_i].nlocks--;
		etcd_lease_slot_set_lost(leases[lease_i].slot, lease_id);
		etcd_lock_check_lost();
		if (attempt == 3)
			ereport(ERROR,
					(errcode(ERRCODE_ETCD_LOCK_LOST),
					 errmsg("etcd dropped every lease granted for lock \"%s\"", name)));
	}

	if (status != ETCD_RECIPE_OWNED)
		return NULL;

	drop_pending(handle);
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

/*
 * release_key() for SQL calls, which report etcd's failure as an ERROR.  The
 * request may have reached etcd even when its answer did not, so after an
 * ERROR the lock is not held any more as far as this session knows: it is
 * forgotten, and its guarded delete retried later.
 */
static bool
release_for_sql(LocalLock *lock)
{
	MemoryContext cxt = CurrentMemoryContext;
	char		handle[ETCD_LOCK_KEY_MAX];
	int64		revision = lock->revision;
	int			lease_i = lock->lease;
	bool		deleted;

	strlcpy(handle, lock->handle, sizeof(handle));
	PG_TRY();
	{
		deleted = release_key(lock, ERROR);
	}
	PG_CATCH();
	{
		HOLD_INTERRUPTS();
		MemoryContextSwitchTo(cxt);
		etcd_stat_add(released, 1);
		lock_forget(lock);
		defer_release(lease_i, handle, revision);
		RESUME_INTERRUPTS();
		PG_RE_THROW();
	}
	PG_END_TRY();
	return deleted;
}

/* Release one hold of a session lock; the last hold deletes the key. */
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
				 errmsg("you don't own a session-level etcd lock with this handle"),
				 errdetail("Handle: %s", handle)));
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

	deleted = release_for_sql(lock);
	if (!deleted)
		ereport(WARNING,
				(errcode(ERRCODE_ETCD_LOCK_LOST),
				 errmsg("etcd lock was lost before it was released"),
				 errdetail("The key %s was no longer in etcd.", handle)));
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
	char	  **names;
	int			nnames = 0;
	int			released = 0;
	int			i;

	etcd_lock_check_lost();
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
		if (leases[i].id == 0 || leases[i].lost || going[i] != leases[i].nlocks)
			continue;
		/* stop renewal first, and take it back if etcd cannot be reached */
		etcd_lease_slot_hand_over(leases[i].slot, leases[i].id, false);
		PG_TRY();
		{
			etcd_lease_revoke(leases[i].id, ERROR);
		}
		PG_CATCH();
		{
			etcd_lease_slot_reclaim(leases[i].slot, leases[i].id);
			PG_RE_THROW();
		}
		PG_END_TRY();
		/* its keys are gone: forget its locks now, before anything can fail */
		leases[i].lost = true;
		hash_seq_init(&seq, local_locks);
		while ((lock = hash_seq_search(&seq)) != NULL)
		{
			if (lock->lease != i)
				continue;
			if (!lock->lost)
			{
				released++;
				etcd_stat_add(released, 1);
			}
			lock_forget(lock);	/* the last one forgets the lease too */
		}
		if (leases[i].id != 0 && leases[i].nlocks == 0)
			lease_forget(i);	/* it had no lock: an idle lease */
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

	etcd_lock_check_lost();
	lock = lock_by_handle(handle);
	if (lock == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("this session holds no etcd lock with handle \"%s\"", handle)));
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
	etcd_lock_check_lost();
	if (!etcd_lock_commit_check)
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
			etcd_stat_add(lost, 1);
			ereport(ERROR,
					(errcode(ERRCODE_ETCD_LOCK_LOST),
					 errmsg("etcd transaction lock \"%s\" was lost before commit", lock->name),
					 errdetail("Its key %s is no longer in etcd with revision " INT64_FORMAT ", so another holder may have taken the lock.",
							   lock->handle, lock->revision),
					 errhint("The transaction was rolled back; retry it.")));
		}
	}
}

/* Drop every transaction hold; the last hold of a lock releases its key. */
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
		release_key(lock, WARNING);
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
	callback_unreachable = false;
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
			 * writes.  Interrupts are held off here; each request is bounded
			 * by etcd_lock.request_timeout, and after one failure the other
			 * releases are deferred without trying.
			 */
		case XACT_EVENT_COMMIT:
			/* with synchronous_commit off, the commit record may still be in memory */
			if (XactLastCommitEnd != InvalidXLogRecPtr)
				XLogFlush(XactLastCommitEnd);
			release_xact_locks();
			break;
		case XACT_EVENT_ABORT:
			release_xact_locks();
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
	callback_unreachable = false;

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
						release_key(lock, WARNING);
					else
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
	MemoryContextSwitchTo(old);
}

/*
 * Session end, normal or by pg_terminate_backend: revoke every lease, which
 * deletes every key of this session, held or waiting.  On a crash nothing
 * runs, and etcd frees the locks when the leases expire.  This runs before
 * the transaction abort of a dying backend, so it forgets everything.
 */
static void
etcd_lock_exit(int code, Datum arg)
{
	HASH_SEQ_STATUS seq;
	LocalLock  *lock;
	int			i;
	bool		reachable = true;

	HOLD_INTERRUPTS();
	MemoryContextSwitchTo(callback_cxt);
	etcd_watch_stop();
	/* hand every lease to the worker first: if this exit is cut short, it revokes them */
	for (i = 0; i < nleases; i++)
		if (leases[i].id != 0 && !leases[i].lost)
			etcd_lease_slot_hand_over(leases[i].slot, leases[i].id, false);
	for (i = 0; i < nleases; i++)
	{
		if (leases[i].id == 0)
			continue;
		if (leases[i].lost)
			lease_forget(i);
		else
			reachable = lease_drop(i, reachable);	/* one failure is enough */
	}
	hash_seq_init(&seq, local_locks);
	while ((lock = hash_seq_search(&seq)) != NULL)
	{
		if (!lock->lost)
			etcd_stat_add(released, 1);
		hash_search(local_locks, lock->etcd_name, HASH_REMOVE, NULL);
	}
	/* also the slot of a wait that a FATAL interrupted */
	etcd_shmem_forget_backend();
	xact_locks = 0;
	npending = 0;
	RESUME_INTERRUPTS();
}
