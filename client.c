/*-------------------------------------------------------------------------
 *
 * client.c
 *		  The etcd client: HTTP/JSON requests to etcd's gateway through
 *		  libcurl's multi interface, waited on with PostgreSQL latches.
 *
 * Every wait goes through etcd_multi_wait(), which sleeps on the process
 * latch and on curl's sockets at once.  Backends call CHECK_FOR_INTERRUPTS()
 * after each wake, so cancel, statement_timeout and lock_timeout are
 * reported by PostgreSQL itself, at once.
 *
 * IDENTIFICATION
 *		  client.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <ctype.h>
#include <math.h>
#include <unistd.h>

#include <curl/curl.h>

#include "common/base64.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "etcd_lock.h"

/* Sockets one multi handle may watch; curl uses one or two per transfer. */
#define ETCD_MAX_SOCKETS	256

/* A response larger than this is refused: etcd's own limit is ~1.5 MB. */
#define ETCD_MAX_BODY		(4 * 1024 * 1024)

struct EtcdMulti
{
	CURLM	   *multi;
	int			nsocks;
	curl_socket_t socks[ETCD_MAX_SOCKETS];
	int			what[ETCD_MAX_SOCKETS];
	/* latch, postmaster and sockets; rebuilt only when the sockets change */
	WaitEventSet *set;
	bool		set_stale;
};

/*
 * Curl handles and response buffers live for the whole process, so they are
 * malloc'd: no memory context may reset them under curl's feet.
 */
struct EtcdTransfer
{
	CURL	   *easy;
	struct curl_slist *headers;
	char	   *buf;
	size_t		len;
	size_t		cap;
	size_t		consumed;		/* watch streams: bytes already parsed */
	bool		too_big;
	bool		active;			/* added to a multi handle */
	bool		done;
	CURLcode	code;
	char		errbuf[CURL_ERROR_SIZE];
	bool		with_auth;		/* send the auth token, if we have one */
	char	   *header_token;	/* the token in headers, malloc'd */
};

/* This backend's client: one multi handle, a unary and a watch transfer. */
static EtcdMulti *backend_multi = NULL;
static EtcdTransfer *unary = NULL;
static EtcdTransfer *watch = NULL;

/*
 * Parsed etcd_lock.endpoints, the member that answered last, and until when
 * each member that just failed is tried only after the others.
 */
static char **endpoints = NULL;
static int	nendpoints = 0;
static bool endpoints_stale = true;
static int	preferred_endpoint = 0;
static TimestampTz *skip_until = NULL;

/* A member that failed goes to the back of the line for this long. */
#define ENDPOINT_BACKOFF_MS	3000

/* Requests started by this process give up at this time (0: never). */
static TimestampTz request_deadline = 0;

static bool curl_ready = false;

/* Watch state: when it started, and whether etcd confirmed it. */
static TimestampTz watch_started;
static bool watch_created;
static int64 watch_revision;	/* etcd's revision when the watch started */
static int	watch_endpoint;		/* the member it was sent to */

/*
 * A waiter re-checks its queue this often even without an event, so that a
 * member that froze (and so never sends the event) cannot strand it.
 */
#define WATCH_RECHECK_MS	5000

/*
 * etcd auth token, shared by everything in this process.  malloc'd: it
 * outlives transactions.  NULL until authenticated, or when auth is off.
 */
static char *auth_token = NULL;
static bool auth_off = false;	/* etcd said auth is not enabled */

/*
 * Bumped when the TLS files change.  curl does not compare every TLS option
 * when it reuses a connection (not the key file), so a multi handle made
 * before the change is dropped, with its connections.
 */
static int	tls_generation = 0;
static int	backend_tls_generation = 0;

static void
curl_init_once(void)
{
	if (curl_ready)
		return;
	if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
		ereport(ERROR,
				(errcode(ERRCODE_SYSTEM_ERROR),
				 errmsg("could not initialize libcurl")));
	curl_ready = true;
}

/*
 * Called from the GUC assign hook: reparse lazily, since assign hooks must
 * not fail.
 */
void
etcd_endpoints_changed(void)
{
	endpoints_stale = true;
}

static void
parse_endpoints(void)
{
	MemoryContext old;
	char	   *copy;
	char	   *tok;
	char	   *save;
	int			i;

	if (!endpoints_stale)
		return;

	old = MemoryContextSwitchTo(TopMemoryContext);
	if (endpoints)
	{
		for (i = 0; i < nendpoints; i++)
			pfree(endpoints[i]);
		pfree(endpoints);
	}
	endpoints = palloc0(sizeof(char *) * (strlen(etcd_lock_endpoints) / 2 + 2));
	if (skip_until)
		pfree(skip_until);
	skip_until = palloc0(sizeof(TimestampTz) * (strlen(etcd_lock_endpoints) / 2 + 2));
	nendpoints = 0;
	copy = pstrdup(etcd_lock_endpoints);
	for (tok = strtok_r(copy, ", \t", &save); tok; tok = strtok_r(NULL, ", \t", &save))
	{
		size_t		len = strlen(tok);

		/* paths are appended as "/v3/...", so drop a trailing slash */
		while (len > 0 && tok[len - 1] == '/')
			tok[--len] = '\0';
		if (len > 0)
			endpoints[nendpoints++] = pstrdup(tok);
	}
	pfree(copy);
	MemoryContextSwitchTo(old);

	if (preferred_endpoint >= nendpoints)
		preferred_endpoint = 0;
	endpoints_stale = false;
}

int
etcd_endpoint_count(void)
{
	parse_endpoints();
	if (nendpoints == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("etcd_lock.endpoints lists no endpoint")));
	return nendpoints;
}

const char *
etcd_endpoint(int i)
{
	int			n = etcd_endpoint_count();	/* parses endpoints[] first */

	return endpoints[i % n];
}

/*
 * The order in which to try the members: the one that answered last, then
 * the others in turn, and those that failed lately last, the longest-failed
 * first.  Backends and the worker both go by it.  Returns how many.
 */
int
etcd_endpoint_order(int *order)
{
	TimestampTz now = GetCurrentTimestamp();
	int			n = etcd_endpoint_count();
	int			k = 0;
	int			i;

	for (i = 0; i < n; i++)
	{
		int			idx = (preferred_endpoint + i) % n;

		if (skip_until[idx] <= now)
			order[k++] = idx;
	}
	while (k < n)
	{
		int			best = -1;

		for (i = 0; i < n; i++)
		{
			int			j;
			bool		taken = false;

			if (skip_until[i] <= now)
				continue;
			for (j = 0; j < k; j++)
				taken |= order[j] == i;
			if (!taken && (best < 0 || skip_until[i] < skip_until[best]))
				best = i;
		}
		order[k++] = best;
	}
	return n;
}

/* A member gave no usable answer: try the others first for a while. */
void
etcd_endpoint_failed(int idx)
{
	(void) etcd_endpoint_count();
	skip_until[idx % nendpoints] =
		TimestampTzPlusMilliseconds(GetCurrentTimestamp(), ENDPOINT_BACKOFF_MS);
	if (preferred_endpoint == idx % nendpoints)
		preferred_endpoint = (preferred_endpoint + 1) % nendpoints;
}

/* A member answered: prefer it from now on. */
void
etcd_endpoint_ok(int idx)
{
	(void) etcd_endpoint_count();
	skip_until[idx % nendpoints] = 0;
	preferred_endpoint = idx % nendpoints;
}

/*
 * Bound every request this process starts from now on by one deadline (0:
 * none), as transaction-end cleanup must be.  Returns the old one.
 */
TimestampTz
etcd_set_deadline(TimestampTz deadline)
{
	TimestampTz old = request_deadline;

	request_deadline = deadline;
	return old;
}

/* A request's time limit: request_timeout, cut to the deadline if any. */
long
etcd_request_time_limit(void)
{
	long		ms = etcd_lock_request_timeout;

	if (request_deadline != 0)
		ms = Min(ms, TimestampDifferenceMilliseconds(GetCurrentTimestamp(),
													 request_deadline));
	return ms;
}

/* ----------------------------------------------------------------
 * PostgreSQL version differences, all here
 * ----------------------------------------------------------------
 */

/* The wait_event_info of what this process waits for. */
static uint32
wait_event_info(EtcdWait what)
{
#if PG_VERSION_NUM >= 170000
	static const char *const names[ETCD_NWAITS] = {
		"EtcdLockWait", "EtcdRequest", "EtcdLeaseWorker"
	};
	static uint32 info[ETCD_NWAITS];

	/* registered once per cluster, looked up once per process */
	if (info[what] == 0)
		info[what] = WaitEventExtensionNew(names[what]);
	return info[what];
#else
	return PG_WAIT_EXTENSION;
#endif
}

/* A wait event set that lives until freed, owned by no resource owner. */
static WaitEventSet *
create_wait_event_set(int nevents)
{
#if PG_VERSION_NUM >= 170000
	return CreateWaitEventSet(NULL, nevents);
#else
	return CreateWaitEventSet(TopMemoryContext, nevents);
#endif
}

/* ----------------------------------------------------------------
 * The multi driver
 * ----------------------------------------------------------------
 */

static int
multi_socket_cb(CURL *easy, curl_socket_t s, int what, void *userp, void *socketp)
{
	EtcdMulti  *m = (EtcdMulti *) userp;
	int			i;

	for (i = 0; i < m->nsocks; i++)
		if (m->socks[i] == s)
			break;

	if (what == CURL_POLL_REMOVE)
	{
		if (i < m->nsocks)
		{
			m->nsocks--;
			m->socks[i] = m->socks[m->nsocks];
			m->what[i] = m->what[m->nsocks];
			m->set_stale = true;
		}
		return 0;
	}
	if (i == m->nsocks)
	{
		if (m->nsocks >= ETCD_MAX_SOCKETS)
			return -1;			/* curl fails the transfer; never reached */
		m->socks[m->nsocks++] = s;
		m->set_stale = true;
	}
	else if (m->what[i] != what)
		m->set_stale = true;
	m->what[i] = what;
	return 0;
}

EtcdMulti *
etcd_multi_create(void)
{
	EtcdMulti  *m;

	curl_init_once();
	m = calloc(1, sizeof(EtcdMulti));
	if (m == NULL || (m->multi = curl_multi_init()) == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory")));
	curl_multi_setopt(m->multi, CURLMOPT_SOCKETFUNCTION, multi_socket_cb);
	curl_multi_setopt(m->multi, CURLMOPT_SOCKETDATA, m);
	return m;
}

static size_t
transfer_write_cb(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	EtcdTransfer *t = (EtcdTransfer *) userdata;
	size_t		n = size * nmemb;

	/* never ereport here: report through the return value instead */
	if (t->len - t->consumed + n > ETCD_MAX_BODY)
	{
		t->too_big = true;
		return 0;
	}
	if (t->len + n + 1 > t->cap)
	{
		size_t		newcap = Max(t->cap * 2, t->len + n + 1);
		char	   *nb = realloc(t->buf, newcap);

		if (nb == NULL)
			return 0;
		t->buf = nb;
		t->cap = newcap;
	}
	memcpy(t->buf + t->len, ptr, n);
	t->len += n;
	t->buf[t->len] = '\0';
	return n;
}

EtcdTransfer *
etcd_transfer_create(void)
{
	EtcdTransfer *t;
	CURL	   *e;

	curl_init_once();
	t = calloc(1, sizeof(EtcdTransfer));
	if (t == NULL || (t->easy = e = curl_easy_init()) == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory")));

	t->with_auth = true;

	curl_easy_setopt(e, CURLOPT_PRIVATE, t);
	curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, transfer_write_cb);
	curl_easy_setopt(e, CURLOPT_WRITEDATA, t);
	curl_easy_setopt(e, CURLOPT_ERRORBUFFER, t->errbuf);
	curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
	/* never through a proxy from the server's environment (http_proxy...) */
	curl_easy_setopt(e, CURLOPT_PROXY, "");
	curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L);
	curl_easy_setopt(e, CURLOPT_TCP_NODELAY, 1L);
	curl_easy_setopt(e, CURLOPT_POST, 1L);
	return t;
}

/* Headers: JSON, and the auth token when there is one (none when auth is off). */
static void
transfer_headers(EtcdTransfer *t, const char *token)
{
	char	   *line;

	if (t->headers != NULL &&
		((token == NULL && t->header_token == NULL) ||
		 (token && t->header_token && strcmp(token, t->header_token) == 0)))
		return;
	curl_slist_free_all(t->headers);
	free(t->header_token);
	t->header_token = NULL;
	t->headers = curl_slist_append(NULL, "Content-Type: application/json");
	/* no "Expect: 100-continue" round trip for larger bodies */
	t->headers = curl_slist_append(t->headers, "Expect:");
	if (token)
	{
		/* etcd wants the bare token, without "Bearer" */
		line = psprintf("Authorization: %s", token);
		t->headers = curl_slist_append(t->headers, line);
		pfree(line);
		t->header_token = strdup(token);
	}
	curl_easy_setopt(t->easy, CURLOPT_HTTPHEADER, t->headers);
}

/*
 * TLS settings.  Peer and host name verification stay on (curl's default):
 * nothing here can turn them off.
 */
static void
transfer_tls(EtcdTransfer *t)
{
	curl_easy_setopt(t->easy, CURLOPT_CAINFO,
					 etcd_lock_cacert[0] ? etcd_lock_cacert : NULL);
	curl_easy_setopt(t->easy, CURLOPT_SSLCERT,
					 etcd_lock_cert[0] ? etcd_lock_cert : NULL);
	curl_easy_setopt(t->easy, CURLOPT_SSLKEY,
					 etcd_lock_key[0] ? etcd_lock_key : NULL);
	curl_easy_setopt(t->easy, CURLOPT_SSL_VERIFYPEER, 1L);
	curl_easy_setopt(t->easy, CURLOPT_SSL_VERIFYHOST, 2L);
}

void
etcd_transfer_start(EtcdMulti *m, EtcdTransfer *t, const char *url,
					const char *body, long timeout_ms)
{
	CURLMcode	rc;

	if (t->active)
		etcd_transfer_stop(m, t);

	transfer_headers(t, t->with_auth ? auth_token : NULL);
	transfer_tls(t);

	t->len = 0;
	t->consumed = 0;
	t->too_big = false;
	t->done = false;
	t->code = CURLE_OK;
	t->errbuf[0] = '\0';

	curl_easy_setopt(t->easy, CURLOPT_URL, url);
	curl_easy_setopt(t->easy, CURLOPT_POSTFIELDSIZE, (long) strlen(body));
	curl_easy_setopt(t->easy, CURLOPT_COPYPOSTFIELDS, body);
	curl_easy_setopt(t->easy, CURLOPT_TIMEOUT_MS, timeout_ms);
	curl_easy_setopt(t->easy, CURLOPT_CONNECTTIMEOUT_MS, (long) etcd_lock_request_timeout);

	/*
	 * No ERROR here: this runs at transaction end too.  A request that
	 * cannot start ends at once, as a transport failure.
	 */
	rc = curl_multi_add_handle(m->multi, t->easy);
	if (rc != CURLM_OK)
	{
		t->done = true;
		t->code = CURLE_FAILED_INIT;
		snprintf(t->errbuf, sizeof(t->errbuf), "could not start the request: %s",
				 curl_multi_strerror(rc));
		return;
	}
	t->active = true;
}

/* Whether to send the auth token with this transfer's requests. */
void
etcd_transfer_set_auth(EtcdTransfer *t, bool with_auth)
{
	t->with_auth = with_auth;
}

void
etcd_transfer_stop(EtcdMulti *m, EtcdTransfer *t)
{
	if (!t->active)
		return;
	/* a finished transfer leaves its connection in the multi's pool */
	curl_multi_remove_handle(m->multi, t->easy);
	t->active = false;
}

bool
etcd_transfer_done(EtcdTransfer *t)
{
	return t->done;
}

/*
 * Wait until curl has work to do, the latch is set, or max_wait_ms passes
 * (-1: no limit of our own), then let curl run.  Returns true if the latch
 * was set.  The caller decides whether to CHECK_FOR_INTERRUPTS().
 */
bool
etcd_multi_wait(EtcdMulti *m, long max_wait_ms, EtcdWait what)
{
	WaitEvent	events[ETCD_MAX_SOCKETS + 2];
	long		timeout = -1;
	int			nevents = 0;
	int			running;
	bool		latch_set = false;
	CURLMsg    *msg;
	int			left;
	int			i;

	curl_multi_timeout(m->multi, &timeout);
	if (max_wait_ms >= 0 && (timeout < 0 || timeout > max_wait_ms))
		timeout = max_wait_ms;

	if (timeout != 0)
	{
		/*
		 * A kept-alive connection keeps its socket, so the set usually
		 * survives from one request to the next: no epoll set per request.
		 */
		if (m->set == NULL || m->set_stale)
		{
			WaitEventSet *set;

			if (m->set)
				FreeWaitEventSet(m->set);
			m->set = NULL;
			set = create_wait_event_set(m->nsocks + 2);
			PG_TRY();
			{
				AddWaitEventToSet(set, WL_LATCH_SET, PGINVALID_SOCKET, MyLatch, NULL);
				AddWaitEventToSet(set, WL_POSTMASTER_DEATH, PGINVALID_SOCKET, NULL, NULL);
				for (i = 0; i < m->nsocks; i++)
				{
					uint32		ev = 0;

					if (m->what[i] & CURL_POLL_IN)
						ev |= WL_SOCKET_READABLE;
					if (m->what[i] & CURL_POLL_OUT)
						ev |= WL_SOCKET_WRITEABLE;
					if (ev)
						AddWaitEventToSet(set, ev, m->socks[i], NULL, NULL);
				}
			}
			PG_CATCH();
			{
				/* owned by no resource owner (see create_wait_event_set): free it here */
				FreeWaitEventSet(set);
				PG_RE_THROW();
			}
			PG_END_TRY();
			m->set = set;
			m->set_stale = false;
		}
		nevents = WaitEventSetWait(m->set, timeout, events, lengthof(events),
								   wait_event_info(what));
	}

	for (i = 0; i < nevents; i++)
	{
		if (events[i].events & WL_POSTMASTER_DEATH)
		{
			if (!proc_exit_inprogress)
				proc_exit(1);
		}
		else if (events[i].events & WL_LATCH_SET)
		{
			ResetLatch(MyLatch);
			latch_set = true;
		}
		else
		{
			int			flags = 0;

			if (events[i].events & WL_SOCKET_READABLE)
				flags |= CURL_CSELECT_IN;
			if (events[i].events & WL_SOCKET_WRITEABLE)
				flags |= CURL_CSELECT_OUT;
			curl_multi_socket_action(m->multi, events[i].fd, flags, &running);
		}
	}
	/* also covers curl's timers: connect and transfer timeouts, retries */
	curl_multi_socket_action(m->multi, CURL_SOCKET_TIMEOUT, 0, &running);

	while ((msg = curl_multi_info_read(m->multi, &left)) != NULL)
	{
		EtcdTransfer *t;

		if (msg->msg != CURLMSG_DONE)
			continue;
		curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **) &t);
		t->done = true;
		t->code = msg->data.result;
	}
	return latch_set;
}

/* ----------------------------------------------------------------
 * Results
 * ----------------------------------------------------------------
 */

static char *
json_message(cJSON *obj)
{
	cJSON	   *msg;

	msg = cJSON_GetObjectItemCaseSensitive(obj, "message");
	if (!cJSON_IsString(msg))
		msg = cJSON_GetObjectItemCaseSensitive(obj, "error");
	if (cJSON_IsString(msg))
		return pstrdup(msg->valuestring);
	return pstrdup("etcd gave no error message");
}

/* Fill *res from a finished transfer whose body is body[0..len). */
static bool
parse_result(EtcdTransfer *t, const char *body, size_t len, EtcdResult *res)
{
	cJSON	   *err;

	res->json = cJSON_ParseWithLength(body, len);
	if (res->json == NULL || !cJSON_IsObject(res->json))
	{
		res->kind = ETCD_RES_PROTOCOL;
		res->error = psprintf("HTTP status %ld with a body that is not a JSON object",
							  res->http_status);
		res->json = NULL;
		return false;
	}
	if (res->http_status != 200)
	{
		res->kind = ETCD_RES_ERROR;
		res->error = json_message(res->json);
		res->grpc_code = (int) etcd_json_int64(res->json, "code");
		return false;
	}
	/* streamed calls report errors inside a 200 body */
	err = cJSON_GetObjectItemCaseSensitive(res->json, "error");
	if (cJSON_IsObject(err))
	{
		/* 3.4 says grpc_code and http_code; 3.5 says code only */
		res->kind = ETCD_RES_ERROR;
		res->error = json_message(err);
		res->grpc_code = (int) etcd_json_int64(err, "grpc_code");
		if (res->grpc_code == 0)
			res->grpc_code = (int) etcd_json_int64(err, "code");
		if (etcd_json_int64(err, "http_code") != 0)
			res->http_status = etcd_json_int64(err, "http_code");
		else if (res->grpc_code == 14)
			res->http_status = 503;		/* Unavailable: worth another member */
		return false;
	}
	res->kind = ETCD_RES_OK;
	return true;
}

bool
etcd_transfer_result(EtcdTransfer *t, EtcdResult *res)
{
	memset(res, 0, sizeof(EtcdResult));
	res->curl_code = t->code;
	res->timed_out = t->code == CURLE_OPERATION_TIMEDOUT;
	if (t->code != CURLE_OK)
	{
		res->kind = t->too_big ? ETCD_RES_PROTOCOL : ETCD_RES_TRANSPORT;
		if (t->too_big)
			res->error = psprintf("response larger than %d bytes", ETCD_MAX_BODY);
		else
			res->error = pstrdup(t->errbuf[0] ? t->errbuf : curl_easy_strerror(t->code));
		return false;
	}
	curl_easy_getinfo(t->easy, CURLINFO_RESPONSE_CODE, &res->http_status);
	return parse_result(t, t->buf ? t->buf : "", t->len, res);
}

/* ----------------------------------------------------------------
 * Backend requests
 * ----------------------------------------------------------------
 */

void
etcd_tls_changed(void)
{
	tls_generation++;
}

int
etcd_tls_generation(void)
{
	return tls_generation;
}

/* Drop a multi handle and every connection in its pool. */
void
etcd_multi_destroy(EtcdMulti *m)
{
	if (m->set)
		FreeWaitEventSet(m->set);
	curl_multi_cleanup(m->multi);
	free(m);
}

void
etcd_client_init(void)
{
	/* new TLS files: start over, unless a watch is running on the old pool */
	if (backend_multi != NULL && backend_tls_generation != tls_generation &&
		!unary->active && !watch->active)
	{
		etcd_multi_destroy(backend_multi);
		backend_multi = etcd_multi_create();
		backend_tls_generation = tls_generation;
	}
	if (backend_multi != NULL)
		return;
	backend_tls_generation = tls_generation;
	backend_multi = etcd_multi_create();
	unary = etcd_transfer_create();
	watch = etcd_transfer_create();
}

/* Run the unary transfer to its end, waking for interrupts. */
static void
run_unary(void)
{
	PG_TRY();
	{
		while (!unary->done)
		{
			etcd_multi_wait(backend_multi, -1, ETCD_WAIT_REQUEST);
			CHECK_FOR_INTERRUPTS();
		}
	}
	PG_FINALLY();
	{
		etcd_transfer_stop(backend_multi, unary);
	}
	PG_END_TRY();
}

/* Drop the cached token: settings changed, or etcd said it is invalid. */
void
etcd_auth_reset(void)
{
	free(auth_token);
	auth_token = NULL;
	auth_off = false;
}

/* One request to one endpoint, without the auth token when with_auth is off. */
static bool
request_once(int idx, const char *path, const char *body, bool with_auth,
			 EtcdResult *res)
{
	char	   *url;
	bool		ok;
	long		limit = etcd_request_time_limit();

	if (limit <= 0)
	{
		/* the caller's deadline passed: fail without sending anything */
		memset(res, 0, sizeof(EtcdResult));
		res->kind = ETCD_RES_TRANSPORT;
		res->curl_code = CURLE_OPERATION_TIMEDOUT;
		res->error = pstrdup("no time was left for the request");
		res->endpoint = endpoints[idx];
		return false;
	}
	url = psprintf("%s%s", endpoints[idx], path);
	unary->with_auth = with_auth;
	etcd_transfer_start(backend_multi, unary, url, body, limit);
	etcd_stat_add(ETCD_STAT_REQUESTS, 1);
	run_unary();
	pfree(url);
	ok = etcd_transfer_result(unary, res);
	res->endpoint = endpoints[idx];
	if (!ok)
		etcd_stat_add(ETCD_STAT_FAILURES, 1);
	return ok;
}

/*
 * With etcd_lock.user set, get a token from endpoint idx unless we have one.
 * An etcd without auth answers "authentication is not enabled": then we send
 * no token at all, since such an etcd refuses any Authorization header.
 */
static bool
authenticate(int idx, EtcdResult *res)
{
	char	   *body;
	bool		ok;

	if (!etcd_auth_wanted())
		return true;
	body = etcd_auth_body();
	ok = request_once(idx, "/v3/auth/authenticate", body, false, res);
	/* the body holds the password: wipe it before freeing */
	memset(body, 0, strlen(body));
	pfree(body);
	return etcd_auth_accept(ok, res);
}

/*
 * One request to endpoint idx, authenticating first if needed, and again
 * once if etcd says the token is invalid (tokens expire when idle).
 */
static bool
request_endpoint(int idx, const char *path, const char *body, EtcdResult *res)
{
	int			attempt;

	for (attempt = 0; attempt < 2; attempt++)
	{
		if (!authenticate(idx, res))
		{
			res->auth_failed = true;
			return false;
		}
		if (request_once(idx, path, body, true, res))
			return true;
		if (!(res->kind == ETCD_RES_ERROR && res->http_status == 401 &&
			  etcd_lock_user[0] != '\0'))
			return false;
		etcd_auth_reset();
	}
	return false;
}

/* Whether another member could answer where this one did not. */
static bool
worth_failover(EtcdResult *res)
{
	if (res->auth_failed)
		return res->kind != ETCD_RES_ERROR;
	switch (res->kind)
	{
		case ETCD_RES_ERROR:
			/* an answer from etcd itself would be the same from any member */
			return res->http_status >= 500;
		case ETCD_RES_TRANSPORT:
			/* our own certificate files are the same for every member */
			return res->curl_code != CURLE_SSL_CACERT_BADFILE &&
				res->curl_code != CURLE_SSL_CERTPROBLEM;
		default:
			return true;
	}
}

/*
 * Send one request, failing over to the next endpoint when one gives no
 * answer (or a 5xx one).  The member that answers is preferred afterwards.
 * Interrupts are processed while waiting unless the caller holds them off.
 * Returns false and fills res on failure.
 */
bool
etcd_request(const char *path, cJSON *req, EtcdResult *res)
{
	char	   *body = cJSON_PrintUnformatted(req);
	int		   *order;
	int			n;
	int			i;

	etcd_client_init();
	order = palloc(sizeof(int) * etcd_endpoint_count());
	n = etcd_endpoint_order(order);
	for (i = 0; i < n; i++)
	{
		if (request_endpoint(order[i], path, body, res))
		{
			etcd_endpoint_ok(order[i]);
			pfree(body);
			return true;
		}
		if (!worth_failover(res))
			break;
		/* out of time is the caller's deadline, not the member's fault */
		if (etcd_request_time_limit() <= 0)
			break;
		etcd_endpoint_failed(order[i]);
	}
	pfree(body);
	return false;
}

/* One request to one given endpoint, no failover: for health checks. */
bool
etcd_request_endpoint(int idx, const char *path, cJSON *req, EtcdResult *res)
{
	char	   *body = cJSON_PrintUnformatted(req);
	bool		ok;

	etcd_client_init();
	(void) etcd_endpoint_count();
	ok = request_endpoint(idx, path, body, res);
	pfree(body);
	return ok;
}

/*
 * The worker authenticates on its own transfers, without waiting: these
 * three let it ask whether it needs a token, build the request, and take
 * the answer.
 */
bool
etcd_auth_wanted(void)
{
	return etcd_lock_user[0] != '\0' && auth_token == NULL && !auth_off;
}

/* The body of an authenticate request; the caller wipes and frees it. */
char *
etcd_auth_body(void)
{
	cJSON	   *req = cJSON_CreateObject();

	cJSON_AddStringToObject(req, "name", etcd_lock_user);
	cJSON_AddStringToObject(req, "password", etcd_lock_password);
	return cJSON_PrintUnformatted(req);
}

/* Take etcd's answer to an authenticate request; false if it failed. */
bool
etcd_auth_accept(bool ok, EtcdResult *res)
{
	cJSON	   *token;

	if (!ok)
	{
		/* "authentication is not enabled": send no token, and stop asking */
		auth_off = res->kind == ETCD_RES_ERROR && res->grpc_code == 9;
		return auth_off;
	}
	token = cJSON_GetObjectItemCaseSensitive(res->json, "token");
	if (!cJSON_IsString(token))
	{
		res->kind = ETCD_RES_PROTOCOL;
		res->error = pstrdup("etcd's authenticate answer has no token");
		return false;
	}
	free(auth_token);
	auth_token = strdup(token->valuestring);
	return auth_token != NULL;
}

static int
grpc_sqlstate(EtcdResult *res)
{
	switch (res->grpc_code)
	{
		case 3:					/* InvalidArgument */
		case 11:				/* OutOfRange */
			return ERRCODE_INVALID_PARAMETER_VALUE;
		case 5:					/* NotFound */
			return ERRCODE_UNDEFINED_OBJECT;
		case 7:					/* PermissionDenied */
			return ERRCODE_INSUFFICIENT_PRIVILEGE;
		case 8:					/* ResourceExhausted */
			return ERRCODE_INSUFFICIENT_RESOURCES;
		case 9:					/* FailedPrecondition */
			return ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE;
		case 16:				/* Unauthenticated */
			return ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION;
		case 4:					/* DeadlineExceeded */
		case 14:				/* Unavailable */
			return ERRCODE_CONNECTION_FAILURE;
	}
	if (res->http_status >= 500)
		return ERRCODE_CONNECTION_FAILURE;
	return ERRCODE_SYSTEM_ERROR;
}

/* A transport failure, told in terms of our settings and the endpoint. */
static void
report_transport(int elevel, const char *path, EtcdResult *res, const char *ep)
{
	const char *tried = nendpoints > 1 ?
		psprintf(" (the last of %d endpoints tried)", nendpoints) : "";

	switch (res->curl_code)
	{
		case CURLE_SSL_CACERT_BADFILE:
			ereport(elevel,
					(errcode(ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION),
					 errmsg("could not load the CA file \"%s\" set in etcd_lock.cacert",
							etcd_lock_cacert),
					 errdetail_internal("%s", res->error),
					 errcontext("etcd request %s to %s", path, ep)));
			break;
		case CURLE_SSL_CERTPROBLEM:
			if (etcd_lock_cert[0] && access(etcd_lock_cert, R_OK) != 0)
				ereport(elevel,
						(errcode(ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION),
						 errmsg("could not read the client certificate \"%s\" set in etcd_lock.cert: %m",
								etcd_lock_cert),
						 errcontext("etcd request %s to %s", path, ep)));
			else if (etcd_lock_key[0] && access(etcd_lock_key, R_OK) != 0)
				ereport(elevel,
						(errcode(ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION),
						 errmsg("could not read the client key \"%s\" set in etcd_lock.key: %m",
								etcd_lock_key),
						 errcontext("etcd request %s to %s", path, ep)));
			else
				ereport(elevel,
						(errcode(ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION),
						 errmsg("could not use the client certificate \"%s\" and key \"%s\"",
								etcd_lock_cert, etcd_lock_key),
						 errdetail_internal("%s", res->error),
						 errcontext("etcd request %s to %s", path, ep)));
			break;
		case CURLE_PEER_FAILED_VERIFICATION:
			ereport(elevel,
					(errcode(ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION),
					 errmsg("could not verify the TLS certificate of etcd at %s%s", ep, tried),
					 errdetail_internal("%s", res->error),
					 errhint("The server certificate must be signed by the CA in etcd_lock.cacert (%s) and name the endpoint's host.",
							 etcd_lock_cacert[0] ? etcd_lock_cacert : "the system CAs when empty"),
					 errcontext("etcd request %s to %s", path, ep)));
			break;
		case CURLE_SSL_CONNECT_ERROR:
		case CURLE_SEND_ERROR:
		case CURLE_RECV_ERROR:
		case CURLE_HTTP2:		/* TLS endpoints speak HTTP/2 */
		case CURLE_HTTP2_STREAM:
			ereport(elevel,
					(errcode(ERRCODE_CONNECTION_FAILURE),
					 errmsg("connection to etcd at %s failed%s", ep, tried),
					 errdetail_internal("%s", res->error),
					 strncmp(ep, "https://", 8) == 0 ?
					 errhint("etcd may have refused the client certificate (etcd_lock.cert = \"%s\").",
							 etcd_lock_cert) : 0,
					 errcontext("etcd request %s to %s", path, ep)));
			break;
		case CURLE_GOT_NOTHING:
			ereport(elevel,
					(errcode(ERRCODE_CONNECTION_FAILURE),
					 errmsg("etcd at %s closed the connection without answering%s", ep, tried),
					 errdetail_internal("%s", res->error),
					 errhint("An http:// endpoint that points at a TLS port does this."),
					 errcontext("etcd request %s to %s", path, ep)));
			break;
		case CURLE_OPERATION_TIMEDOUT:
			ereport(elevel,
					(errcode(ERRCODE_CONNECTION_FAILURE),
					 errmsg("etcd at %s did not answer within etcd_lock.request_timeout (%d ms)%s",
							ep, etcd_lock_request_timeout, tried),
					 errdetail_internal("%s", res->error),
					 errcontext("etcd request %s to %s", path, ep)));
			break;
		default:
			ereport(elevel,
					(errcode(ERRCODE_CONNECTION_FAILURE),
					 errmsg("could not reach etcd at %s%s", ep, tried),
					 errdetail_internal("%s", res->error),
					 errcontext("etcd request %s to %s", path, ep)));
			break;
	}
}

/* Report a failed request at elevel, etcd's own text in DETAIL. */
void
etcd_report(int elevel, const char *path, EtcdResult *res)
{
	const char *ep = res->endpoint ? res->endpoint : "(none)";

	if (res->kind == ETCD_RES_TRANSPORT)
		report_transport(elevel, path, res, ep);
	else if (res->kind == ETCD_RES_PROTOCOL)
		ereport(elevel,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("invalid response from etcd at %s", ep),
				 errdetail_internal("%s", res->error),
				 errcontext("etcd request %s", path)));
	else if (res->auth_failed)
		ereport(elevel,
				(errcode(res->http_status >= 500 ? ERRCODE_CONNECTION_FAILURE :
						 ERRCODE_INVALID_PASSWORD),
				 errmsg("etcd authentication failed for user \"%s\"", etcd_lock_user),
				 errdetail_internal("%s", res->error),
				 errhint("Check etcd_lock.user and etcd_lock.password."),
				 errcontext("etcd request %s to %s", "/v3/auth/authenticate", ep)));
	else if (etcd_lock_user[0] == '\0' && res->error &&
			 strstr(res->error, "user name is empty") != NULL)
		ereport(elevel,
				(errcode(ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION),
				 errmsg("etcd at %s requires authentication", ep),
				 errdetail_internal("%s", res->error),
				 errhint("Set etcd_lock.user and etcd_lock.password."),
				 errcontext("etcd request %s", path)));
	else
		ereport(elevel,
				(errcode(grpc_sqlstate(res)),
				 errmsg("etcd at %s rejected the request", ep),
				 errdetail_internal("%s", res->error),
				 errcontext("etcd request %s", path)));
}

/* etcd_request() that raises an ERROR on failure and returns the body. */
cJSON *
etcd_call(const char *path, cJSON *req)
{
	EtcdResult	res;

	if (!etcd_request(path, req, &res))
		etcd_report(ERROR, path, &res);
	return res.json;
}

/* ----------------------------------------------------------------
 * Watch: one stream at a time, for the key a waiter queues behind
 * ----------------------------------------------------------------
 */

/*
 * Watch key for its deletion, from etcd's head revision: etcd delivers at
 * once to such a watch, while one that starts at an older revision waits for
 * etcd's 100 ms catch-up loop.  etcd_watch_revision() tells, once the watch
 * is created, from which revision it sees changes.
 */
void
etcd_watch_start(const char *key)
{
	cJSON	   *req = cJSON_CreateObject();
	cJSON	   *create = cJSON_AddObjectToObject(req, "create_request");
	cJSON	   *filters = cJSON_AddArrayToObject(create, "filters");
	char	   *body;
	char	   *url;

	etcd_client_init();
	etcd_json_add_key(create, "key", key);
	/* only deletions can let us in */
	cJSON_AddItemToArray(filters, cJSON_CreateString("NOPUT"));
	body = cJSON_PrintUnformatted(req);
	{
		int		   *order = palloc(sizeof(int) * etcd_endpoint_count());

		etcd_endpoint_order(order);
		watch_endpoint = order[0];
		pfree(order);
	}
	url = psprintf("%s/v3/watch", endpoints[watch_endpoint]);

	/* no total timeout: the stream lasts as long as the wait */
	etcd_transfer_start(backend_multi, watch, url, body, 0L);
	etcd_stat_add(ETCD_STAT_REQUESTS, 1);
	watch_started = GetCurrentTimestamp();
	watch_created = false;
	pfree(url);
	pfree(body);
}

/* The revision at which the current watch started, once it is created. */
int64
etcd_watch_revision(void)
{
	return watch_revision;
}

void
etcd_watch_stop(void)
{
	if (backend_multi)
		etcd_transfer_stop(backend_multi, watch);
}

/* Look at the complete lines buffered so far. */
static EtcdWatchEvent
watch_scan(void)
{
	while (watch->consumed < watch->len)
	{
		char	   *start = watch->buf + watch->consumed;
		char	   *nl = memchr(start, '\n', watch->len - watch->consumed);
		cJSON	   *msg;
		cJSON	   *result;
		cJSON	   *ev;

		if (nl == NULL)
			break;
		watch->consumed = (nl - watch->buf) + 1;
		msg = cJSON_ParseWithLength(start, nl - start);
		if (msg == NULL)
			return ETCD_WATCH_ENDED;
		result = cJSON_GetObjectItemCaseSensitive(msg, "result");
		if (result == NULL)
			return ETCD_WATCH_ENDED;	/* an in-body error */
		/* a canceled watch (compaction) stays open: treat as the end */
		if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(result, "canceled")))
			return ETCD_WATCH_ENDED;
		if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(result, "created")))
		{
			watch_created = true;
			watch_revision = etcd_json_int64(
				cJSON_GetObjectItemCaseSensitive(result, "header"), "revision");
			return ETCD_WATCH_CREATED;
		}
		cJSON_ArrayForEach(ev, cJSON_GetObjectItemCaseSensitive(result, "events"))
		{
			cJSON	   *type = cJSON_GetObjectItemCaseSensitive(ev, "type");

			/* PUT is the zero value and is left out of the JSON */
			if (cJSON_IsString(type) && strcmp(type->valuestring, "DELETE") == 0)
				return ETCD_WATCH_DELETED;
		}
	}
	if (watch->consumed == watch->len)
		watch->consumed = watch->len = 0;
	return ETCD_WATCH_NONE;
}

/* The watch failed: pause briefly, interruptibly, and try another member. */
static EtcdWatchEvent
watch_failed(void)
{
	TimestampTz until = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), 100);
	long		ms;

	etcd_stat_add(ETCD_STAT_FAILURES, 1);
	etcd_transfer_stop(backend_multi, watch);
	etcd_endpoint_failed(watch_endpoint);
	while ((ms = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), until)) > 0)
	{
		etcd_multi_wait(backend_multi, ms, ETCD_WAIT_REQUEST);
		CHECK_FOR_INTERRUPTS();
	}
	return ETCD_WATCH_ENDED;
}

/*
 * Wait for the watched key's deletion, the end of the stream, a latch
 * wakeup, or the deadline (0: none).  ENDED also comes every
 * WATCH_RECHECK_MS, and when etcd has not confirmed the watch within
 * etcd_lock.request_timeout.  Interrupts raise an ERROR; the caller stops
 * the watch in its error path.
 */
EtcdWatchEvent
etcd_watch_wait(TimestampTz deadline)
{
	for (;;)
	{
		EtcdWatchEvent r = watch_scan();
		TimestampTz now = GetCurrentTimestamp();
		TimestampTz until;
		long		wait_ms;

		if (r != ETCD_WATCH_NONE)
			return r;
		if (watch->done)
		{
			if (watch->code != CURLE_OK)
				return watch_failed();
			return ETCD_WATCH_ENDED;
		}
		if (!watch_created &&
			now >= TimestampTzPlusMilliseconds(watch_started, etcd_lock_request_timeout))
			return watch_failed();
		if (deadline != 0 && now >= deadline)
			return ETCD_WATCH_TIMEOUT;
		if (now >= TimestampTzPlusMilliseconds(watch_started, WATCH_RECHECK_MS))
			return ETCD_WATCH_ENDED;

		until = TimestampTzPlusMilliseconds(watch_started,
											watch_created ? WATCH_RECHECK_MS :
											etcd_lock_request_timeout);
		if (deadline != 0 && deadline < until)
			until = deadline;
		wait_ms = Max(1, TimestampDifferenceMilliseconds(now, until));
		if (etcd_multi_wait(backend_multi, wait_ms, ETCD_WAIT_LOCK))
		{
			CHECK_FOR_INTERRUPTS();
			return ETCD_WATCH_WAKEUP;
		}
		CHECK_FOR_INTERRUPTS();
	}
}

/* ----------------------------------------------------------------
 * JSON and base64
 * ----------------------------------------------------------------
 */

char *
etcd_b64(const char *data, int len)
{
	int			enclen = pg_b64_enc_len(len);
	char	   *out = palloc(enclen + 1);
	int			n = pg_b64_encode(data, len, out, enclen);

	if (n < 0)
		elog(ERROR, "could not encode %d bytes as base64", len);
	out[n] = '\0';
	return out;
}

char *
etcd_unb64(const char *b64, int *len)
{
	int			inlen = strlen(b64);
	int			declen = pg_b64_dec_len(inlen);
	char	   *out = palloc(declen + 1);
	int			n = pg_b64_decode(b64, inlen, out, declen);

	if (n < 0)
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("invalid base64 data in etcd's response")));
	out[n] = '\0';
	if (len)
		*len = n;
	return out;
}

/*
 * etcd sends int64 as strings and leaves out zero values: a missing field is
 * 0.  Anything but a whole decimal number in range is malformed (false).
 */
bool
etcd_json_get_int64(cJSON *obj, const char *field, int64 *out)
{
	cJSON	   *item = cJSON_GetObjectItemCaseSensitive(obj, field);

	*out = 0;
	if (item == NULL)
		return true;
	if (cJSON_IsString(item))
	{
		const char *s = item->valuestring;
		char	   *end;

		if (*s == '\0' || !(isdigit((unsigned char) *s) || *s == '-'))
			return false;
		errno = 0;
		*out = strtoll(s, &end, 10);
		return errno == 0 && *end == '\0';
	}
	if (cJSON_IsNumber(item))
	{
		/* only small numbers come as JSON numbers (error codes) */
		if (!(fabs(item->valuedouble) <= 1e15) ||
			item->valuedouble != (double) (int64) item->valuedouble)
			return false;
		*out = (int64) item->valuedouble;
		return true;
	}
	return false;
}

/* Lenient: a malformed value reads as 0.  For fields where 0 is harmless. */
int64
etcd_json_int64(cJSON *obj, const char *field)
{
	int64		v;

	if (!etcd_json_get_int64(obj, field, &v))
		return 0;
	return v;
}

/*
 * A revision, lease ID or TTL that etcd must send: missing, malformed or not
 * positive is a protocol error, never 0.
 */
int64
etcd_json_need_int64(cJSON *obj, const char *field, const char *path)
{
	int64		v;

	if (!etcd_json_get_int64(obj, field, &v) || v <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_PROTOCOL_VIOLATION),
				 errmsg("invalid response from etcd"),
				 errdetail("The field \"%s\" is missing, malformed or not positive.", field),
				 errcontext("etcd request %s", path)));
	return v;
}

/* Follow a dotted path of object members; NULL when any step is missing. */
cJSON *
etcd_json_get(cJSON *obj, const char *path)
{
	char	   *copy = pstrdup(path);
	char	   *tok;
	char	   *save;

	for (tok = strtok_r(copy, ".", &save); tok && obj; tok = strtok_r(NULL, ".", &save))
		obj = cJSON_GetObjectItemCaseSensitive(obj, tok);
	pfree(copy);
	return obj;
}

/* Never let cJSON print an int64 as a double: etcd rejects that. */
void
etcd_json_add_int64(cJSON *obj, const char *field, int64 value)
{
	char		buf[32];

	snprintf(buf, sizeof(buf), INT64_FORMAT, value);
	cJSON_AddStringToObject(obj, field, buf);
}

void
etcd_json_add_key(cJSON *obj, const char *field, const char *key)
{
	cJSON_AddStringToObject(obj, field, etcd_b64(key, strlen(key)));
}
