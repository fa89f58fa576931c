/*
 * gostyle.c: the per-lock pattern of the Go code that motivated etcd_lock.
 *
 * That code does, for every lock:
 *
 *   cli, _ := clientv3.New(cfg)                  // a new connection (and TLS handshake)
 *   s, _ := concurrency.NewSession(cli)          // lease grant (TTL 60)
 *   m := concurrency.NewMutex(s, name)
 *   m.Lock(ctx)                                  // the recipe's txn
 *   ... work ...
 *   m.Unlock(ctx)                                // delete mykey
 *   s.Close()                                    // lease revoke
 *   cli.Close()                                  // close the connection
 *
 * This driver sends the same requests through etcd's HTTP/JSON gateway, on
 * a NEW curl easy handle per lock (so a new TCP connection, and over https
 * a full TLS handshake with the client certificate: a new handle has an
 * empty session cache), and closes it after the revoke:
 *
 *   POST /v3/lease/grant       {"TTL":"60"}
 *   POST /v3/kv/txn            compare CREATE(mykey)==0;
 *                              success put mykey lease=ID, range NAME/ first-created (limit 1);
 *                              failure range mykey, range NAME/ first-created
 *   POST /v3/kv/deleterange    mykey                     (Mutex.Unlock)
 *   POST /v3/lease/revoke      ID                        (Session.Close)
 *
 * The txn is concurrency.Mutex's exact txn (etcd 3.4).  NewSession also
 * starts a keepalive stream that sends one keepalive at once; that request is
 * left out unless --keepalive is given, which only makes this peer faster.
 *
 *   gostyle --url https://127.0.0.1:PORT --clients 8 --secs 5
 *           [--cacert ca.pem --cert client.pem --key client-key.pem] [--keepalive]
 *
 * Build: gcc -O2 -o gostyle gostyle.c -lcurl -lcjson -lpthread
 */
#include "bench_common.h"

static void *
thread_main(void *arg)
{
	Thread	   *t = arg;
	char		body[4096];
	char		name[256],
				pfx[300],
				pend[300],
				key[320];
	char		k64[512],
				p64[512],
				pe64[512];

	snprintf(name, sizeof(name), "%s%d", opts.prefix, t->id);
	snprintf(pfx, sizeof(pfx), "%s/", name);
	prefix_end(pfx, pend);
	b64(pfx, p64);
	b64(pend, pe64);

	wait_for_start();

	while (now_s() < t_deadline)
	{
		double		t0 = now_s();
		CURL	   *e = new_handle(t);	/* clientv3.New: a new connection */
		cJSON	   *resp;
		int64_t		lease = 0;
		int			ok = 0;

		snprintf(body, sizeof(body), "{\"TTL\":\"%d\"}", opts.ttl > 0 ? opts.ttl : 60);
		resp = post(t, e, "/v3/lease/grant", body);
		if (resp)
		{
			lease = jint(resp, "ID");
			cJSON_Delete(resp);
		}
		if (lease > 0 && opts.keepalive)
		{
			snprintf(body, sizeof(body), "{\"ID\":\"%lld\"}", (long long) lease);
			cJSON_Delete(post(t, e, "/v3/lease/keepalive", body));
		}
		if (lease > 0)
		{
			cJSON	   *kvs;

			snprintf(key, sizeof(key), "%s/%llx", name, (unsigned long long) lease);
			b64(key, k64);
			snprintf(body, sizeof(body),
					 "{\"compare\":[{\"key\":\"%s\",\"target\":\"CREATE\",\"result\":\"EQUAL\",\"create_revision\":\"0\"}],"
					 "\"success\":[{\"request_put\":{\"key\":\"%s\",\"value\":\"\",\"lease\":\"%lld\"}},"
					 "{\"request_range\":{\"key\":\"%s\",\"range_end\":\"%s\",\"sort_order\":\"ASCEND\",\"sort_target\":\"CREATE\",\"limit\":\"1\"}}],"
					 "\"failure\":[{\"request_range\":{\"key\":\"%s\"}},"
					 "{\"request_range\":{\"key\":\"%s\",\"range_end\":\"%s\",\"sort_order\":\"ASCEND\",\"sort_target\":\"CREATE\",\"limit\":\"1\"}}]}",
					 k64, k64, (long long) lease, p64, pe64, k64, p64, pe64);
			resp = post(t, e, "/v3/kv/txn", body);
			if (resp)
			{
				/* the owner (first created key under NAME/) is our key */
				kvs = cJSON_GetObjectItemCaseSensitive(
					cJSON_GetObjectItemCaseSensitive(
						cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(resp, "responses"), 1),
						"response_range"),
					"kvs");
				ok = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(resp, "succeeded")) &&
					cJSON_IsString(cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(kvs, 0), "key")) &&
					strcmp(cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(kvs, 0), "key")->valuestring, k64) == 0;
				if (!ok)
					snprintf(t->err, sizeof(t->err), "lock not owned: %.300s", t->body.p);
				cJSON_Delete(resp);
			}
			if (ok)
			{
				/* Mutex.Unlock */
				snprintf(body, sizeof(body), "{\"key\":\"%s\"}", k64);
				resp = post(t, e, "/v3/kv/deleterange", body);
				ok = resp != NULL && jint(resp, "deleted") == 1;
				cJSON_Delete(resp);
			}
			/* Session.Close */
			snprintf(body, sizeof(body), "{\"ID\":\"%lld\"}", (long long) lease);
			resp = post(t, e, "/v3/lease/revoke", body);
			if (!resp)
				ok = 0;
			cJSON_Delete(resp);
		}
		curl_easy_cleanup(e);	/* cli.Close: the connection goes */
		if (!ok)
		{
			t->errors++;
			break;
		}
		lat_add(t, now_s() - t0);
	}
	t->t_end = now_s();
	return NULL;
}

int
main(int argc, char **argv)
{
	parse_args(argc, argv);
	return run_threads();
}
