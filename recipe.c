/*-------------------------------------------------------------------------
 *
 * recipe.c
 *		  The etcd requests of etcd's lock recipe (the layout of
 *		  concurrency.Mutex and `etcdctl lock`): grant and revoke a lease,
 *		  queue a key, look at the queue, release and verify keys.
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

#include "utils/timestamp.h"

#include "client.h"
#include "recipe.h"
#include "shmem.h"

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
	etcd_stat_add(ETCD_STAT_LEASE_GRANTS, 1);
	id = etcd_json_need_int64(resp, "ID", "/v3/lease/grant");
	*granted_ttl = (int) Min(etcd_json_need_int64(resp, "TTL", "/v3/lease/grant"),
							 ETCD_LOCK_MAX_TTL);
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
EtcdRecipeStatus
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

		*myrev = etcd_json_need_int64(kv, "create_revision", "/v3/kv/txn");
		return etcd_recipe_check(name, mykey, *myrev, pred, watch_from);
	}

	/* the put's revision is the txn's revision */
	*myrev = etcd_json_need_int64(cJSON_GetObjectItemCaseSensitive(resp, "header"),
								  "revision", "/v3/kv/txn");
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
EtcdRecipeStatus
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
	*watch_from = etcd_json_need_int64(cJSON_GetObjectItemCaseSensitive(resp, "header"),
									   "revision", "/v3/kv/txn") + 1;
	return ETCD_RECIPE_WAIT;
}

/*
 * Delete mykey if it is still the key we created.  The guard keeps a stale
 * release from deleting a newer holder's key.  A failed request is reported
 * at elevel.
 */
EtcdReleaseStatus
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

