/*
 * floor.c: the physical floor of an uncontended etcd lock and unlock.
 *
 * One thread per client, each with its own kept-alive curl easy handle and
 * its own lease, granted once before the clock starts.  Each timed pair is
 * exactly the two requests etcd_lock sends for an uncontended lock and
 * unlock (recipe.c):
 *
 *   lock:   POST /v3/kv/txn
 *           compare  CREATE(mykey) == 0
 *           success  put mykey "" lease=ID; range NAME/ .. NAME0, newest
 *                    creation first, limit 2, keys only (the owner check)
 *           failure  range mykey
 *   unlock: POST /v3/kv/txn
 *           compare  CREATE(mykey) == myrev
 *           success  delete mykey
 *
 * mykey is NAME/<lease id in lower-case hex>, as in etcd's recipe.  The
 * request bodies are byte-for-byte the shape cJSON prints in recipe.c.
 * No PostgreSQL is involved: this is etcd plus HTTP plus JSON.
 *
 *   floor --url http://127.0.0.1:2379 --clients 8 --secs 5 [--prefix P]
 *         [--cacert ca.pem --cert client.pem --key client-key.pem]
 *
 * Build: gcc -O2 -o floor floor.c -lcurl -lcjson -lpthread
 */
#include "bench_common.h"

static void *
thread_main(void *arg)
{
	Thread	   *t = arg;
	CURL	   *e = new_handle(t);
	cJSON	   *resp;
	int64_t		lease = 0;
	char		body[4096];
	char		name[256],
				pfx[300],
				pend[300],
				key[320];
	char		k64[512],
				p64[512],
				pe64[512];
	int			ttl = opts.ttl > 0 ? opts.ttl : (int) opts.secs + 60;

	/* set-up, not timed: one lease for the whole run */
	snprintf(body, sizeof(body), "{\"TTL\":\"%d\"}", ttl);
	resp = post(t, e, "/v3/lease/grant", body);
	if (resp)
	{
		lease = jint(resp, "ID");
		cJSON_Delete(resp);
	}
	if (lease <= 0)
		t->errors++;

	snprintf(name, sizeof(name), "%s%d", opts.prefix, t->id);
	snprintf(pfx, sizeof(pfx), "%s/", name);
	prefix_end(pfx, pend);
	snprintf(key, sizeof(key), "%s/%llx", name, (unsigned long long) lease);
	b64(key, k64);
	b64(pfx, p64);
	b64(pend, pe64);

	wait_for_start();

	while (lease > 0 && now_s() < t_deadline)
	{
		double		t0 = now_s();
		int64_t		rev = 0;
		int			owned = 0;

		snprintf(body, sizeof(body),
				 "{\"compare\":[{\"key\":\"%s\",\"target\":\"CREATE\",\"result\":\"EQUAL\",\"create_revision\":\"0\"}],"
				 "\"success\":[{\"request_put\":{\"key\":\"%s\",\"value\":\"\",\"lease\":\"%lld\"}},"
				 "{\"request_range\":{\"key\":\"%s\",\"range_end\":\"%s\",\"sort_order\":\"DESCEND\",\"sort_target\":\"CREATE\",\"limit\":\"2\",\"keys_only\":true}}],"
				 "\"failure\":[{\"request_range\":{\"key\":\"%s\"}}]}",
				 k64, k64, (long long) lease, p64, pe64, k64);
		resp = post(t, e, "/v3/kv/txn", body);
		if (resp)
		{
			cJSON	   *kvs;

			rev = jint(cJSON_GetObjectItemCaseSensitive(resp, "header"), "revision");
			kvs = cJSON_GetObjectItemCaseSensitive(
				cJSON_GetObjectItemCaseSensitive(
					cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(resp, "responses"), 1),
					"response_range"),
				"kvs");
			/* ours is the only key under NAME/: we own the lock */
			owned = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(resp, "succeeded")) &&
				cJSON_GetArraySize(kvs) == 1;
			if (!owned)
				snprintf(t->err, sizeof(t->err), "lock not owned: %.300s", t->body.p);
			cJSON_Delete(resp);
		}
		if (!owned)
		{
			t->errors++;
			break;
		}

		snprintf(body, sizeof(body),
				 "{\"compare\":[{\"key\":\"%s\",\"target\":\"CREATE\",\"result\":\"EQUAL\",\"create_revision\":\"%lld\"}],"
				 "\"success\":[{\"request_delete_range\":{\"key\":\"%s\"}}]}",
				 k64, (long long) rev, k64);
		resp = post(t, e, "/v3/kv/txn", body);
		if (!resp || !cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(resp, "succeeded")))
		{
			if (resp)
				snprintf(t->err, sizeof(t->err), "unlock failed: %.300s", t->body.p);
			cJSON_Delete(resp);
			t->errors++;
			break;
		}
		cJSON_Delete(resp);
		lat_add(t, now_s() - t0);
	}
	t->t_end = now_s();

	/* clean-up, not timed */
	if (lease > 0)
	{
		snprintf(body, sizeof(body), "{\"ID\":\"%lld\"}", (long long) lease);
		cJSON_Delete(post(t, e, "/v3/lease/revoke", body));
		t->requests--;			/* count only the timed requests */
	}
	t->requests--;				/* and not the grant */
	curl_easy_cleanup(e);
	return NULL;
}

int
main(int argc, char **argv)
{
	parse_args(argc, argv);
	return run_threads();
}
