/*-------------------------------------------------------------------------
 *
 * http.c
 *		  The HTTP driver: requests through libcurl's multi interface,
 *		  waited on with PostgreSQL's latch, and the TLS settings they use.
 *
 * Every wait goes through etcd_multi_wait(), which sleeps on the process
 * latch and on curl's sockets at once.  Callers run CHECK_FOR_INTERRUPTS()
 * after each wake, so cancel, statement_timeout and lock_timeout are
 * reported by PostgreSQL itself, at once.
 *
 * This file knows HTTP and TLS, not etcd: what the answers mean, which
 * member to ask and how to authenticate are the etcd client's (client.c).
 * Nothing here raises an ERROR once a transfer has been set up, because
 * transaction-end cleanup sends requests too.
 *
 * IDENTIFICATION
 *		  http.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <unistd.h>

#include <curl/curl.h>

#include "miscadmin.h"
#include "pgstat.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/wait_event.h"

#include "http.h"

/* Sockets one multi handle may watch; curl uses one or two per transfer. */
#define ETCD_MAX_SOCKETS	256

/* A response larger than this is refused: etcd's own limit is ~1.5 MB. */
#define ETCD_MAX_BODY_MB	4
#define ETCD_MAX_BODY		(ETCD_MAX_BODY_MB * 1024 * 1024)

/*
 * libcurl before 8.0.0 (Debian 12 has 7.88.1) cannot reuse a connection
 * opened with HTTP/2 prior knowledge: the second request on it fails with
 * "Error in the HTTP2 framing layer" (curl issue 10634) before the request
 * is sent, and the connection is spoilt.  So a request to a host that has
 * had an HTTP/2 connection asks for HTTP/2 without prior knowledge, which
 * rides the open connection.  If that connection is gone, curl opens a new
 * one with an HTTP/1.1 upgrade, which etcd ignores: the header callback
 * aborts that answer, and the request is sent again with prior knowledge on
 * a fresh connection.  A request with prior knowledge that meets the bug is
 * sent again the same way, as is one that meets a connection spoilt in
 * any other way ("framing layer" errors).  Sending again is as safe as the
 * failover to another member: every request of ours may be repeated.
 */
#if LIBCURL_VERSION_NUM < 0x080000
#define H2C_REUSE_BUG 1
#endif
#define H2_HOSTS			16

struct EtcdMulti
{
	CURLM	   *multi;
	int			nsocks;
	curl_socket_t socks[ETCD_MAX_SOCKETS];
	int			what[ETCD_MAX_SOCKETS];
	/* latch, postmaster and sockets; rebuilt only when the sockets change */
	WaitEventSet *set;
	bool		set_stale;
	/* http:// hosts ("http://host:port") with an HTTP/2 connection in the pool */
	char		h2_hosts[H2_HOSTS][128];
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
	char	   *header_token;	/* the token in headers, malloc'd */
	bool		header_grpc;	/* headers are gRPC's */
	bool		grpc;			/* this request is a gRPC call */
	int			grpc_status;	/* from the headers or trailers; -1: none */
	char		grpc_message[256];
	bool		retried;		/* restarted once, see h2_retry() */
	long		fresh_version;	/* CURLOPT_HTTP_VERSION on a fresh connection */
	bool		h2_guess;		/* HTTP/2 asked for without prior knowledge */
	bool		h1_answer;		/* ... and refused an HTTP/1 answer */
	char		host[128];		/* "http://host:port", for H2C_REUSE_BUG */
	EtcdMulti  *multi;			/* the multi handle it was started on */
};

/* TLS settings (GUCs) */
static char *tls_cacert = NULL;
static char *tls_cert = NULL;
static char *tls_key = NULL;

static bool curl_ready = false;

static void curl_init_once(void);
static uint32 wait_event_info(EtcdWait what);
static WaitEventSet *create_wait_event_set(int nevents);
static int	multi_socket_cb(CURL *easy, curl_socket_t s, int what, void *userp,
							void *socketp);
static size_t transfer_write_cb(char *ptr, size_t size, size_t nmemb,
								void *userdata);
#ifdef H2C_REUSE_BUG
static void url_host(const char *url, char *host, size_t size);
static int	h2_host_find(EtcdMulti *m, const char *host);
static void h2_host_set(EtcdMulti *m, const char *host, bool open);
#endif
static void h2_retry(EtcdMulti *m, EtcdTransfer *t);
static size_t transfer_header_cb(char *line, size_t size, size_t nitems,
								 void *userdata);
static void transfer_headers(EtcdTransfer *t, const char *token, bool grpc);
static void transfer_tls(EtcdTransfer *t);
static bool string_changed(const char *oldval, const char *newval);
static void assign_cacert(const char *newval, void *extra);
static void assign_cert(const char *newval, void *extra);
static void assign_key(const char *newval, void *extra);

/*
 * Bumped when the TLS files change.  curl does not compare every TLS option
 * when it reuses a connection (not the key file), so a multi handle made
 * before the change is dropped, with its connections.
 */
static int	tls_generation = 0;

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

	curl_easy_setopt(e, CURLOPT_PRIVATE, t);
	curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, transfer_write_cb);
	curl_easy_setopt(e, CURLOPT_WRITEDATA, t);
	curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, transfer_header_cb);
	curl_easy_setopt(e, CURLOPT_HEADERDATA, t);
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

/*
 * Headers of the answer, and over HTTP/2 its trailers: we only want gRPC's
 * status and message.  Never ereport here.
 */
static size_t
transfer_header_cb(char *line, size_t size, size_t nitems, void *userdata)
{
	EtcdTransfer *t = (EtcdTransfer *) userdata;
	size_t		n = size * nitems;

#ifdef H2C_REUSE_BUG
	if (t->host[0] != '\0' && n > 6 && strncmp(line, "HTTP/", 5) == 0)
	{
		/* a status line: HTTP/2 means the host has a connection to reuse */
		if (strncmp(line, "HTTP/2", 6) == 0)
			h2_host_set(t->multi, t->host, true);
		else if (t->h2_guess)
		{
			/* a new connection upgraded by HTTP/1.1: drop it, see above */
			t->h1_answer = true;
			return 0;
		}
	}
#endif
	if (n > 12 && pg_strncasecmp(line, "grpc-status:", 12) == 0)
	{
		char		num[16];
		size_t		len = Min(n - 12, sizeof(num) - 1);
		char	   *end;
		long		v;

		memcpy(num, line + 12, len);
		num[len] = '\0';
		v = strtol(num, &end, 10);
		t->grpc_status = (v >= 0 && v < 1000 && end != num) ? (int) v : 2;
	}
	else if (n > 13 && pg_strncasecmp(line, "grpc-message:", 13) == 0)
	{
		const char *start = line + 13;
		size_t		len = n - 13;

		while (len > 0 && (*start == ' ' || *start == '\t'))
			start++, len--;
		while (len > 0 && (start[len - 1] == '\r' || start[len - 1] == '\n'))
			len--;
		len = Min(len, sizeof(t->grpc_message) - 1);
		memcpy(t->grpc_message, start, len);
		t->grpc_message[len] = '\0';
	}
	return n;
}

/*
 * Headers: JSON or gRPC, and the auth token when there is one (none when
 * auth is off).  etcd takes the token from "authorization" on both: the
 * gateway passes that header on as gRPC metadata.
 */
static void
transfer_headers(EtcdTransfer *t, const char *token, bool grpc)
{
	char	   *line;

	if (t->headers != NULL && t->header_grpc == grpc &&
		((token == NULL && t->header_token == NULL) ||
		 (token && t->header_token && strcmp(token, t->header_token) == 0)))
		return;
	curl_slist_free_all(t->headers);
	free(t->header_token);
	t->header_token = NULL;
	t->header_grpc = grpc;
	if (grpc)
	{
		t->headers = curl_slist_append(NULL, "Content-Type: application/grpc");
		/* gRPC servers refuse a client that does not take trailers */
		t->headers = curl_slist_append(t->headers, "TE: trailers");
	}
	else
		t->headers = curl_slist_append(NULL, "Content-Type: application/json");
	/* no "Expect: 100-continue" round trip for larger bodies */
	t->headers = curl_slist_append(t->headers, "Expect:");
	if (token)
	{
		/* etcd wants the bare token, without "Bearer" */
		size_t		size = strlen(token) + 32;

		struct curl_slist *with_token = NULL;

		/* malloc, not palloc: this runs at transaction end too */
		line = malloc(size);
		if (line != NULL)
		{
			snprintf(line, size, "Authorization: %s", token);
			with_token = curl_slist_append(t->headers, line);
			free(line);
		}
		/* out of memory: the request goes without it, and is built anew next time */
		if (with_token != NULL)
		{
			t->headers = with_token;
			t->header_token = strdup(token);
		}
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
					 tls_cacert[0] ? tls_cacert : NULL);
	curl_easy_setopt(t->easy, CURLOPT_SSLCERT,
					 tls_cert[0] ? tls_cert : NULL);
	curl_easy_setopt(t->easy, CURLOPT_SSLKEY,
					 tls_key[0] ? tls_key : NULL);
	curl_easy_setopt(t->easy, CURLOPT_SSL_VERIFYPEER, 1L);
	curl_easy_setopt(t->easy, CURLOPT_SSL_VERIFYHOST, 2L);
}

/*
 * Start a POST of body[0..len) to url, with token (NULL: none) as etcd's
 * Authorization header; as a gRPC call over HTTP/2 when grpc is set.
 * timeout_ms bounds the whole transfer (0: no limit, for streams).  Never
 * raises an ERROR: a transfer that cannot start is done at once, as a
 * transport failure.
 */
void
etcd_transfer_start(EtcdMulti *m, EtcdTransfer *t, const char *url,
					const char *body, size_t len, const char *token,
					bool grpc, long timeout_ms, long connect_timeout_ms)
{
	CURLMcode	rc;
	long		version;

	if (t->active)
		etcd_transfer_stop(m, t);

	transfer_headers(t, token, grpc);
	transfer_tls(t);

	t->len = 0;
	t->consumed = 0;
	t->too_big = false;
	t->done = false;
	t->code = CURLE_OK;
	t->errbuf[0] = '\0';
	t->grpc = grpc;
	t->grpc_status = -1;
	t->grpc_message[0] = '\0';

	/*
	 * gRPC needs HTTP/2: on http:// with prior knowledge (etcd serves both on
	 * one port), on https:// through ALPN.  JSON keeps curl's default.
	 */
	t->multi = m;
	t->retried = false;
	t->h2_guess = false;
	t->h1_answer = false;
	t->host[0] = '\0';
	t->fresh_version = CURL_HTTP_VERSION_2TLS;
	if (!grpc)
		version = CURL_HTTP_VERSION_NONE;
	else if (strncmp(url, "https://", 8) == 0)
		version = CURL_HTTP_VERSION_2TLS;
	else
	{
		version = CURL_HTTP_VERSION_2_PRIOR_KNOWLEDGE;
		t->fresh_version = version;
#ifdef H2C_REUSE_BUG
		url_host(url, t->host, sizeof(t->host));
		if (h2_host_find(m, t->host) >= 0)
		{
			version = CURL_HTTP_VERSION_2_0;
			t->h2_guess = true;
		}
#endif
	}
	curl_easy_setopt(t->easy, CURLOPT_HTTP_VERSION, version);
	curl_easy_setopt(t->easy, CURLOPT_FRESH_CONNECT, 0L);
	curl_easy_setopt(t->easy, CURLOPT_URL, url);
	curl_easy_setopt(t->easy, CURLOPT_POSTFIELDSIZE, (long) len);
	curl_easy_setopt(t->easy, CURLOPT_COPYPOSTFIELDS, body);
	curl_easy_setopt(t->easy, CURLOPT_TIMEOUT_MS, timeout_ms);
	curl_easy_setopt(t->easy, CURLOPT_CONNECTTIMEOUT_MS, connect_timeout_ms);

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

/* Whether the transfer is started and not stopped yet (done or not). */
bool
etcd_transfer_active(EtcdTransfer *t)
{
	return t->active;
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
		if (t->grpc)
			h2_retry(m, t);
	}
	return latch_set;
}

#ifdef H2C_REUSE_BUG
/* The "http://host:port" part of an http:// URL, or "". */
static void
url_host(const char *url, char *host, size_t size)
{
	const char *slash = strchr(url + 7, '/');
	size_t		len = slash ? (size_t) (slash - url) : strlen(url);

	host[0] = '\0';
	if (strncmp(url, "http://", 7) == 0 && len < size)
	{
		memcpy(host, url, len);
		host[len] = '\0';
	}
}

static int
h2_host_find(EtcdMulti *m, const char *host)
{
	int			i;

	for (i = 0; i < H2_HOSTS; i++)
		if (strcmp(m->h2_hosts[i], host) == 0)
			return i;
	return -1;
}

/* Whether host has an HTTP/2 connection in m's pool. */
static void
h2_host_set(EtcdMulti *m, const char *host, bool open)
{
	int			i = h2_host_find(m, host);

	if (open && i < 0)
	{
		/* a free entry, or else the first */
		i = Max(h2_host_find(m, ""), 0);
		strlcpy(m->h2_hosts[i], host, sizeof(m->h2_hosts[i]));
	}
	else if (!open && i >= 0)
		m->h2_hosts[i][0] = '\0';
}

#endif

/* Drop a multi handle and every connection in its pool. */
void
etcd_multi_destroy(EtcdMulti *m)
{
	if (m->set)
		FreeWaitEventSet(m->set);
	curl_multi_cleanup(m->multi);
	free(m);
}

/* ----------------------------------------------------------------
 * Answers
 * ----------------------------------------------------------------
 */

/* How a finished transfer ended; body points into the transfer's buffer. */
void
etcd_transfer_result(EtcdTransfer *t, EtcdHttpResult *r)
{
	memset(r, 0, sizeof(EtcdHttpResult));
	r->curl_code = t->code;
	r->timed_out = t->code == CURLE_OPERATION_TIMEDOUT;
	r->too_big = t->too_big;
	r->body = t->buf ? t->buf : "";
	r->len = t->len;
	r->grpc = t->grpc;
	r->grpc_status = t->grpc_status;
	r->grpc_message = t->grpc_message;
	if (t->too_big)
		r->error = "The response is larger than " CppAsString2(ETCD_MAX_BODY_MB) " MB, more than etcd ever sends.";
	else if (t->code != CURLE_OK)
		r->error = t->errbuf[0] ? t->errbuf : curl_easy_strerror(t->code);
	else
		curl_easy_getinfo(t->easy, CURLINFO_RESPONSE_CODE, &r->status);
}

/*
 * What a streamed answer has brought that the caller has not consumed yet.
 * Valid until the next etcd_multi_wait(), which may grow the buffer.
 */
char *
etcd_transfer_unread(EtcdTransfer *t, size_t *len)
{
	*len = t->len - t->consumed;
	return t->buf + t->consumed;
}

/* The caller is done with n more bytes of the stream. */
void
etcd_transfer_consume(EtcdTransfer *t, size_t n)
{
	t->consumed += n;
	if (t->consumed >= t->len)
	{
		/* all read: start the buffer over, so a long stream stays small */
		t->consumed = t->len = 0;
	}
}

/* ----------------------------------------------------------------
 * TLS settings, and failures told in their terms
 * ----------------------------------------------------------------
 */

/*
 * Assign hooks run on every reload, changed or not; the variable still holds
 * the old value while they run.
 */
static bool
string_changed(const char *oldval, const char *newval)
{
	return oldval == NULL || strcmp(oldval, newval) != 0;
}

/*
 * Called when a TLS file or the endpoints change.  curl does not compare
 * every TLS option when it reuses a connection (not the key file), so every
 * multi handle made before is dropped by its owner, with its connections.
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

static void
assign_cacert(const char *newval, void *extra)
{
	if (string_changed(tls_cacert, newval))
		etcd_tls_changed();
}

static void
assign_cert(const char *newval, void *extra)
{
	if (string_changed(tls_cert, newval))
		etcd_tls_changed();
}

static void
assign_key(const char *newval, void *extra)
{
	if (string_changed(tls_key, newval))
		etcd_tls_changed();
}

void
etcd_http_define_settings(void)
{
	DefineCustomStringVariable("etcd_lock.cacert",
							   "CA file that https:// endpoints' certificates are verified against.",
							   "Empty means the system's CAs. Verification cannot be turned off.",
							   &tls_cacert,
							   "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY,
							   NULL, assign_cacert, NULL);

	DefineCustomStringVariable("etcd_lock.cert",
							   "Client certificate file presented to etcd (mTLS).",
							   NULL,
							   &tls_cert,
							   "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY,
							   NULL, assign_cert, NULL);

	DefineCustomStringVariable("etcd_lock.key",
							   "Private key file of etcd_lock.cert.",
							   NULL,
							   &tls_key,
							   "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY,
							   NULL, assign_key, NULL);
}

/*
 * Failures that come from our own certificate files: they are the same for
 * every member, so trying another one does not help.
 */
bool
etcd_http_failure_is_ours(int curl_code)
{
	return curl_code == CURLE_SSL_CACERT_BADFILE ||
		curl_code == CURLE_SSL_CERTPROBLEM;
}

/*
 * Report a transfer that got no answer, in terms of the TLS settings and the
 * endpoint; error is curl's text, context says which request it was.
 */
void
etcd_http_report(int elevel, int curl_code, const char *error,
				 const char *endpoint, const char *context)
{
	switch (curl_code)
	{
		case CURLE_SSL_CACERT_BADFILE:
			ereport(elevel,
					(errcode(ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION),
					 errmsg("could not load the CA file \"%s\" set in etcd_lock.cacert",
							tls_cacert),
					 errdetail_internal("%s", error),
					 errcontext("%s", context)));
			break;
		case CURLE_SSL_CERTPROBLEM:
			if (tls_cert[0] && access(tls_cert, R_OK) != 0)
				ereport(elevel,
						(errcode(ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION),
						 errmsg("could not read the client certificate \"%s\" set in etcd_lock.cert: %m",
								tls_cert),
						 errcontext("%s", context)));
			else if (tls_key[0] && access(tls_key, R_OK) != 0)
				ereport(elevel,
						(errcode(ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION),
						 errmsg("could not read the client key \"%s\" set in etcd_lock.key: %m",
								tls_key),
						 errcontext("%s", context)));
			else
				ereport(elevel,
						(errcode(ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION),
						 errmsg("could not use the client certificate \"%s\" and key \"%s\"",
								tls_cert, tls_key),
						 errdetail_internal("%s", error),
						 errcontext("%s", context)));
			break;
		case CURLE_PEER_FAILED_VERIFICATION:
			ereport(elevel,
					(errcode(ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION),
					 errmsg("could not verify the TLS certificate of etcd at %s", endpoint),
					 errdetail_internal("%s", error),
					 tls_cacert[0] ?
					 errhint("The server certificate must be signed by the CA in etcd_lock.cacert (\"%s\") and name the endpoint's host.",
							 tls_cacert) :
					 errhint("The server certificate must be signed by one of the system's CAs, since etcd_lock.cacert is empty, and name the endpoint's host."),
					 errcontext("%s", context)));
			break;
		case CURLE_SSL_CONNECT_ERROR:
		case CURLE_SEND_ERROR:
		case CURLE_RECV_ERROR:
		case CURLE_HTTP2:		/* TLS endpoints and gRPC speak HTTP/2 */
		case CURLE_HTTP2_STREAM:
		case CURLE_PARTIAL_FILE:	/* an HTTP/2 stream cut short */
			ereport(elevel,
					(errcode(ERRCODE_CONNECTION_FAILURE),
					 errmsg("connection to etcd at %s failed", endpoint),
					 errdetail_internal("%s", error),
					 strncmp(endpoint, "https://", 8) != 0 ?
					 errhint("An http:// endpoint that points at a TLS port does this.") :
					 tls_cert[0] ?
					 errhint("etcd may have refused the client certificate \"%s\" set in etcd_lock.cert.",
							 tls_cert) :
					 errhint("etcd may require a client certificate: set etcd_lock.cert and etcd_lock.key."),
					 errcontext("%s", context)));
			break;
		case CURLE_GOT_NOTHING:
			ereport(elevel,
					(errcode(ERRCODE_CONNECTION_FAILURE),
					 errmsg("etcd at %s closed the connection without answering", endpoint),
					 errdetail_internal("%s", error),
					 errhint("An http:// endpoint that points at a TLS port does this."),
					 errcontext("%s", context)));
			break;
		default:
			ereport(elevel,
					(errcode(ERRCODE_CONNECTION_FAILURE),
					 errmsg("could not reach etcd at %s", endpoint),
					 errdetail_internal("%s", error),
					 errcontext("%s", context)));
			break;
	}
}

/*
 * A gRPC transfer ended on a spoilt HTTP/2 connection ("framing layer"
 * errors: curl can try to reuse a connection that etcd has dropped, as when
 * it restarts), or on an HTTP/1.1 answer (see H2C_REUSE_BUG): send it again
 * once, on a fresh connection.  That is as safe as the failover to another
 * member: every request of ours may be repeated.  Never raises an ERROR.
 */
static void
h2_retry(EtcdMulti *m, EtcdTransfer *t)
{
	if (t->code == CURLE_OK || t->retried)
		return;
#ifdef H2C_REUSE_BUG
	if (t->host[0] != '\0' && t->h1_answer)
		h2_host_set(m, t->host, false); /* no HTTP/2 connection was left */
	else if (t->code == CURLE_HTTP2)
	{
		if (t->host[0] != '\0')
			h2_host_set(m, t->host, true);	/* there is one, spoilt */
	}
	else
		return;
#else
	if (t->code != CURLE_HTTP2)
		return;
#endif

	curl_multi_remove_handle(m->multi, t->easy);
	t->retried = true;
	t->h2_guess = false;
	t->h1_answer = false;
	t->done = false;
	t->code = CURLE_OK;
	t->len = t->consumed = 0;
	t->too_big = false;
	t->errbuf[0] = '\0';
	t->grpc_status = -1;
	t->grpc_message[0] = '\0';
	curl_easy_setopt(t->easy, CURLOPT_HTTP_VERSION, t->fresh_version);
	curl_easy_setopt(t->easy, CURLOPT_FRESH_CONNECT, 1L);
	if (curl_multi_add_handle(m->multi, t->easy) != CURLM_OK)
	{
		t->active = false;
		t->done = true;
		t->code = CURLE_FAILED_INIT;
		snprintf(t->errbuf, sizeof(t->errbuf), "could not restart the request");
	}
}
