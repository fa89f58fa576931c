/*-------------------------------------------------------------------------
 *
 * client.c
 *		  The etcd client: etcd's JSON gateway over the HTTP driver, with
 *		  the members to try and in what order, failover, authentication,
 *		  the mapping of etcd's errors to SQLSTATEs, and the watch.
 *
 * Each process (a backend, or the lease worker) has its own client state:
 * the endpoint order, the auth token, and in a backend one transfer for
 * requests and one for the watch.  The worker drives transfers of its own
 * and takes only the pieces it needs from here.
 *
 * IDENTIFICATION
 *		  client.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <ctype.h>
#include <limits.h>
#include <math.h>

#include "common/base64.h"
#include "miscadmin.h"
#include "storage/fd.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "client.h"
#include "grpc.h"
#include "http.h"
#include "shmem.h"

/* settings (GUCs) */
int			etcd_lock_request_timeout = 2000;
static char *endpoints_setting = NULL;
static char *auth_user = NULL;
static char *auth_password_file = NULL;

typedef enum EtcdTransport
{
	ETCD_TRANSPORT_JSON,		/* etcd's JSON gateway, /v3/... */
	ETCD_TRANSPORT_GRPC			/* etcd's gRPC API, over HTTP/2 */
} EtcdTransport;

static const struct config_enum_entry transport_options[] = {
	{"json", ETCD_TRANSPORT_JSON, false},
	{"grpc", ETCD_TRANSPORT_GRPC, false},
	{NULL, 0, false}
};
static int	transport = ETCD_TRANSPORT_JSON;

/* This backend's client: one multi handle, a unary and a watch transfer. */
static EtcdMulti *backend_multi = NULL;
static EtcdTransfer *unary = NULL;
static EtcdTransfer *watch = NULL;
static int	backend_tls_generation = 0;	/* of the TLS files of its pool */

/*
 * Parsed etcd_lock.endpoints, the member that answered last, and until when
 * each member that just failed is tried only after the others.
 */
static char **endpoints = NULL;
static int	nendpoints = 0;
static bool endpoints_stale = true;
static int	preferred_endpoint = 0;
static TimestampTz *skip_until = NULL;

/* The longest password we read from etcd_lock.password_file. */
#define ETCD_PASSWORD_MAX	4096

/* A member that failed goes to the back of the line for this long. */
#define ENDPOINT_BACKOFF_MS	3000

/* Requests started by this process give up at this time (0: never). */
static TimestampTz request_deadline = 0;

/* Watch state: when it started, and whether etcd confirmed it. */
static TimestampTz watch_started;
static bool watch_created;
static int64 watch_revision;	/* etcd's revision when the watch started */
static int	watch_endpoint;		/* the member it was sent to */
static bool watch_grpc;			/* over gRPC, not the gateway */

/*
 * A waiter re-checks its queue this often even without an event, so that a
 * member that froze (and so never sends the event) cannot strand it.
 */
#define WATCH_RECHECK_MS	5000

/*
 * This process's etcd auth token.  malloc'd: it outlives transactions.
 * NULL until authenticated, or when auth is off.
 */
static char *auth_token = NULL;
static bool auth_off = false;	/* etcd said auth is not enabled */
static int	auth_generation = 0;	/* bumped when the credentials change */

static void parse_endpoints(void);
static long request_time_limit(void);
static char *json_message(cJSON *obj);
static bool parse_result(const char *body, size_t len, EtcdResult *res);
static void client_init(void);
static void run_unary(void);
static bool request_once(int idx, const char *path, const char *body,
						 size_t len, bool with_auth, EtcdResult *res);
static bool authenticate(int idx, EtcdResult *res);
static bool request_endpoint(int idx, const char *path, const char *body,
							 size_t len, EtcdResult *res);
static bool parse_grpc_result(const char *path, EtcdHttpResult *r,
							  EtcdResult *res);
static bool worth_failover(EtcdResult *res);
static char *read_password(EtcdResult *res);
static int grpc_sqlstate(EtcdResult *res);
static char *request_context(const char *path, const char *ep);
static int	watch_next(cJSON **msg);
static EtcdWatchEvent watch_scan(void);
static EtcdWatchEvent watch_failed(void);
static char *b64_encode(const char *data, int len);
static bool check_endpoints(char **newval, void **extra, GucSource source);
static void assign_endpoints(const char *newval, void *extra);
static void credentials_changed(void);
static void assign_user(const char *newval, void *extra);
static void assign_password_file(const char *newval, void *extra);
static void assign_transport(int newval, void *extra);

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
	endpoints = palloc0(sizeof(char *) * (strlen(endpoints_setting) / 2 + 2));
	if (skip_until)
		pfree(skip_until);
	skip_until = palloc0(sizeof(TimestampTz) * (strlen(endpoints_setting) / 2 + 2));
	nendpoints = 0;
	copy = pstrdup(endpoints_setting);
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
static long
request_time_limit(void)
{
	long		ms = etcd_lock_request_timeout;

	if (request_deadline != 0)
		ms = Min(ms, TimestampDifferenceMilliseconds(GetCurrentTimestamp(),
													 request_deadline));
	return ms;
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
	return pstrdup("etcd gave no error message.");
}

/* Fill *res from a finished transfer whose body is body[0..len). */
static bool
parse_result(const char *body, size_t len, EtcdResult *res)
{
	cJSON	   *err;

	res->json = cJSON_ParseWithLength(body, len);
	if (res->json == NULL || !cJSON_IsObject(res->json))
	{
		res->kind = ETCD_RES_PROTOCOL;
		res->error = psprintf("The answer has HTTP status %ld and a body that is not a JSON object.",
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

/*
 * A gRPC answer: the status from the trailers, and on success the one
 * message, as the JSON the gateway would have sent.
 */
static bool
parse_grpc_result(const char *path, EtcdHttpResult *r, EtcdResult *res)
{
	const EtcdGrpcMethod *m = etcd_grpc_method(path);
	const char *msg;
	size_t		msglen;
	size_t		framelen;
	char	   *error = NULL;

	res->kind = ETCD_RES_PROTOCOL;
	if (r->status != 200)
		res->error = psprintf("The gRPC answer has HTTP status %ld.", r->status);
	else if (r->grpc_status < 0)
		res->error = pstrdup("The gRPC answer has no grpc-status.");
	else if (r->grpc_status != 0)
	{
		/* what the gateway would have said: same code, same HTTP status */
		res->kind = ETCD_RES_ERROR;
		res->grpc_code = r->grpc_status;
		res->http_status = etcd_grpc_http_status(r->grpc_status);
		res->error = r->grpc_message[0] ? etcd_grpc_message(r->grpc_message) :
			pstrdup("etcd gave no error message.");
	}
	else if (etcd_grpc_next_frame(r->body, r->len, &msg, &msglen, &framelen,
								  &error) != 1 || framelen != r->len)
		res->error = error ? error :
			pstrdup("The gRPC answer is not exactly one whole message.");
	else if ((res->json = etcd_grpc_decode(m, msg, msglen, &error)) == NULL)
		res->error = error;
	else
		res->kind = ETCD_RES_OK;
	return res->kind == ETCD_RES_OK;
}

/*
 * Read etcd's answer to path from a finished transfer, over either
 * transport; false if it is a failure.
 */
bool
etcd_result_read(EtcdTransfer *t, const char *path, EtcdResult *res)
{
	EtcdHttpResult r;

	etcd_transfer_result(t, &r);
	memset(res, 0, sizeof(EtcdResult));
	res->curl_code = r.curl_code;
	res->timed_out = r.timed_out;
	if (r.error != NULL)
	{
		res->kind = r.too_big ? ETCD_RES_PROTOCOL : ETCD_RES_TRANSPORT;
		res->error = pstrdup(r.error);
		return false;
	}
	res->http_status = r.status;
	if (r.grpc)
		return parse_grpc_result(path, &r, res);
	return parse_result(r.body, r.len, res);
}

/*
 * A request's body for the transport in use: the gateway's JSON, or the
 * same as a protobuf message in a gRPC frame.
 */
char *
etcd_request_body(const char *path, cJSON *req, size_t *len)
{
	char	   *body;

	if (transport == ETCD_TRANSPORT_GRPC)
		return etcd_grpc_encode(etcd_grpc_method(path), req, len);
	body = cJSON_PrintUnformatted(req);
	*len = strlen(body);
	return body;
}

/*
 * Start a request to path at member idx, over the transport in use, on a
 * transfer of the caller's.  Raises no ERROR, as etcd_transfer_start.
 */
void
etcd_transfer_begin(EtcdMulti *m, EtcdTransfer *t, int idx, const char *path,
					const char *body, size_t len, const char *token,
					long timeout_ms)
{
	char		url[1024];
	bool		grpc = transport == ETCD_TRANSPORT_GRPC;

	snprintf(url, sizeof(url), "%s%s", etcd_endpoint(idx),
			 grpc ? etcd_grpc_path(etcd_grpc_method(path)) : path);
	etcd_transfer_start(m, t, url, body, len, token, grpc, timeout_ms,
						etcd_lock_request_timeout);
}

static void
client_init(void)
{
	/* new TLS files: start over, unless a watch is running on the old pool */
	if (backend_multi != NULL &&
		backend_tls_generation != etcd_tls_generation() &&
		!etcd_transfer_active(unary) && !etcd_transfer_active(watch))
	{
		etcd_multi_destroy(backend_multi);
		backend_multi = etcd_multi_create();
		backend_tls_generation = etcd_tls_generation();
	}
	if (backend_multi != NULL)
		return;
	backend_tls_generation = etcd_tls_generation();
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
		while (!etcd_transfer_done(unary))
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
request_once(int idx, const char *path, const char *body, size_t len,
			 bool with_auth, EtcdResult *res)
{
	bool		ok;
	long		limit = request_time_limit();

	if (limit <= 0)
	{
		/* the caller's deadline passed: fail without sending anything */
		memset(res, 0, sizeof(EtcdResult));
		res->kind = ETCD_RES_TRANSPORT;
		res->timed_out = true;
		res->error = pstrdup("No time was left for the request.");
		res->endpoint = endpoints[idx];
		return false;
	}
	etcd_transfer_begin(backend_multi, unary, idx, path, body, len,
						with_auth ? auth_token : NULL, limit);
	etcd_stat_add(ETCD_STAT_REQUESTS, 1);
	run_unary();
	ok = etcd_result_read(unary, path, res);
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
	size_t		len;
	bool		ok;

	if (!etcd_auth_wanted())
		return true;
	body = etcd_auth_body(res, &len);
	if (body == NULL)
		return false;
	ok = request_once(idx, "/v3/auth/authenticate", body, len, false, res);
	/* the body holds the password: wipe it before freeing */
	memset(body, 0, len);
	pfree(body);
	return etcd_auth_accept(ok, res);
}

/*
 * One request to endpoint idx, authenticating first if needed, and again
 * once if etcd says the token is invalid (tokens expire when idle).
 */
static bool
request_endpoint(int idx, const char *path, const char *body, size_t len,
				 EtcdResult *res)
{
	int			attempt;

	for (attempt = 0; attempt < 2; attempt++)
	{
		if (!authenticate(idx, res))
		{
			res->auth_failed = true;
			return false;
		}
		if (request_once(idx, path, body, len, true, res))
			return true;
		if (!(res->kind == ETCD_RES_ERROR && res->http_status == 401 &&
			  auth_user[0] != '\0'))
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
			return !etcd_http_failure_is_ours(res->curl_code);
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
	size_t		len;
	char	   *body = etcd_request_body(path, req, &len);
	int		   *order;
	int			n;
	int			i;

	client_init();
	order = palloc(sizeof(int) * etcd_endpoint_count());
	n = etcd_endpoint_order(order);
	for (i = 0; i < n; i++)
	{
		if (request_endpoint(order[i], path, body, len, res))
		{
			etcd_endpoint_ok(order[i]);
			pfree(body);
			return true;
		}
		if (!worth_failover(res))
			break;
		/* out of time is the caller's deadline, not the member's fault */
		if (request_time_limit() <= 0)
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
	size_t		len;
	char	   *body = etcd_request_body(path, req, &len);
	bool		ok;

	client_init();
	(void) etcd_endpoint_count();
	ok = request_endpoint(idx, path, body, len, res);
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
	return auth_user[0] != '\0' && auth_token == NULL && !auth_off;
}

/*
 * Bumped whenever the credentials or endpoints change, so that a process
 * that reports a failure once can tell a new one.
 */
int
etcd_auth_generation(void)
{
	return auth_generation;
}

/* The token to send with requests that need one; NULL when there is none. */
const char *
etcd_auth_token(void)
{
	return auth_token;
}

/*
 * Read the password from etcd_lock.password_file: its contents, less one
 * final line end.  It is read at each authentication, so a new password
 * needs no reload, and it never passes through a setting, which PostgreSQL
 * would log when it changes.  NULL when it cannot be read (reported at
 * elevel).
 */
static char *
read_password(EtcdResult *res)
{
	FILE	   *f;
	char	   *buf;
	size_t		len;

	if (auth_password_file[0] == '\0')
		return pstrdup("");
	f = AllocateFile(auth_password_file, "r");
	if (f == NULL)
	{
		res->password_errno = errno;
		res->password_opened = false;
		return NULL;
	}
	/* room for the longest password, a CR LF, and one byte to tell too long */
	buf = palloc(ETCD_PASSWORD_MAX + 3);
	len = fread(buf, 1, ETCD_PASSWORD_MAX + 3, f);
	if (ferror(f))
		res->password_errno = errno;
	FreeFile(f);
	if (len > 0 && buf[len - 1] == '\n')
		len--;
	if (len > 0 && buf[len - 1] == '\r')
		len--;
	if (res->password_errno != 0 || len > ETCD_PASSWORD_MAX)
	{
		/* password_errno 0: too long */
		res->password_opened = true;
		memset(buf, 0, ETCD_PASSWORD_MAX + 3);
		pfree(buf);
		return NULL;
	}
	buf[len] = '\0';
	return buf;
}

/*
 * The body of an authenticate request, or NULL when the password file
 * cannot be read (told in res, for etcd_report).  The caller wipes and
 * frees it.
 */
char *
etcd_auth_body(EtcdResult *res, size_t *bodylen)
{
	cJSON	   *req;
	char	   *password;
	char	   *body;
	size_t		len;
	int			size;

	memset(res, 0, sizeof(EtcdResult));
	password = read_password(res);
	if (password == NULL)
	{
		/* etcd was not asked: another member would not help either */
		res->kind = ETCD_RES_ERROR;
		res->password_failed = true;
		res->auth_failed = true;
		return NULL;
	}
	len = strlen(password);
	req = cJSON_CreateObject();
	cJSON_AddStringToObject(req, "name", auth_user);
	cJSON_AddStringToObject(req, "password", password);

	if (transport == ETCD_TRANSPORT_GRPC)
		body = etcd_grpc_encode(etcd_grpc_method("/v3/auth/authenticate"), req,
								bodylen);
	else
	{
		/*
		 * Printed into a buffer of our own, so that no copy of the password
		 * is freed unwiped: escaping makes a byte 6 at most.
		 */
		size = (strlen(auth_user) + len) * 6 + 64;
		body = palloc(size);
		if (!cJSON_PrintPreallocated(req, body, size, false))
			elog(ERROR, "could not build the etcd authenticate request");
		*bodylen = strlen(body);
	}
	memset(password, 0, len);
	memset(cJSON_GetObjectItemCaseSensitive(req, "password")->valuestring, 0, len);
	pfree(password);
	cJSON_Delete(req);
	return body;
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
		res->error = pstrdup("etcd's answer to authenticate has no token.");
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

/*
 * Which request failed, for errcontext: with several members, the one named
 * is the last one tried.
 */
static char *
request_context(const char *path, const char *ep)
{
	if (nendpoints > 1)
		return psprintf("etcd request %s to %s, the last of %d endpoints tried",
						path, ep, nendpoints);
	return psprintf("etcd request %s to %s", path, ep);
}

/* Report a failed request at elevel, etcd's own text in DETAIL. */
void
etcd_report(int elevel, const char *path, EtcdResult *res)
{
	const char *ep = res->endpoint ? res->endpoint : "(none)";

	if (res->password_failed && !res->password_opened)
	{
		errno = res->password_errno;
		ereport(elevel,
				(errcode_for_file_access(),
				 errmsg("could not open etcd password file \"%s\": %m",
						auth_password_file)));
	}
	else if (res->password_failed && res->password_errno != 0)
	{
		errno = res->password_errno;
		ereport(elevel,
				(errcode_for_file_access(),
				 errmsg("could not read etcd password file \"%s\": %m",
						auth_password_file)));
	}
	else if (res->password_failed)
		ereport(elevel,
				(errcode(ERRCODE_CONFIG_FILE_ERROR),
				 errmsg("etcd password file \"%s\" is too long", auth_password_file),
				 errdetail("A password can have at most %d bytes.", ETCD_PASSWORD_MAX)));
	else if (res->kind == ETCD_RES_TRANSPORT && res->timed_out)
		ereport(elevel,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("etcd at %s did not answer within etcd_lock.request_timeout (%d ms)",
						ep, etcd_lock_request_timeout),
				 errdetail_internal("%s", res->error),
				 errcontext("%s", request_context(path, ep))));
	else if (res->kind == ETCD_RES_TRANSPORT)
		etcd_http_report(elevel, res->curl_code, res->error, ep,
						 request_context(path, ep));
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
				 errmsg("etcd authentication failed for user \"%s\"", auth_user),
				 errdetail_internal("%s", res->error),
				 errhint("Check etcd_lock.user and the password in etcd_lock.password_file."),
				 errcontext("etcd request %s to %s", "/v3/auth/authenticate", ep)));
	else if (auth_user[0] == '\0' && res->error &&
			 strstr(res->error, "user name is empty") != NULL)
		ereport(elevel,
				(errcode(ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION),
				 errmsg("etcd at %s requires authentication", ep),
				 errdetail_internal("%s", res->error),
				 errhint("Set etcd_lock.user and etcd_lock.password_file."),
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
	size_t		len;

	client_init();
	etcd_json_add_key(create, "key", key);
	/* only deletions can let us in */
	cJSON_AddItemToArray(filters, cJSON_CreateString("NOPUT"));
	body = etcd_request_body("/v3/watch", req, &len);
	watch_grpc = transport == ETCD_TRANSPORT_GRPC;
	{
		int		   *order = palloc(sizeof(int) * etcd_endpoint_count());

		etcd_endpoint_order(order);
		watch_endpoint = order[0];
		pfree(order);
	}

	/*
	 * No total timeout: the stream lasts as long as the wait.  Over gRPC the
	 * request side ends after the one request; etcd keeps the watch anyway.
	 */
	etcd_transfer_begin(backend_multi, watch, watch_endpoint, "/v3/watch",
						body, len, auth_token, 0L);
	etcd_stat_add(ETCD_STAT_REQUESTS, 1);
	watch_started = GetCurrentTimestamp();
	watch_created = false;
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

/*
 * The next whole message of the watch stream, as the gateway's JSON: a line
 * of JSON, or a gRPC frame.  Returns 1 with *msg, 0 when none has come yet,
 * -1 when it is malformed.
 */
static int
watch_next(cJSON **msg)
{
	size_t		len;
	char	   *buf = etcd_transfer_unread(watch, &len);
	char	   *nl;

	if (watch_grpc)
	{
		const char *m;
		size_t		mlen;
		size_t		framelen;
		char	   *error = NULL;
		int			r = etcd_grpc_next_frame(buf, len, &m, &mlen, &framelen, &error);

		if (r <= 0)
			return r;
		*msg = etcd_grpc_decode(etcd_grpc_method("/v3/watch"), m, mlen, &error);
		etcd_transfer_consume(watch, framelen);
		return *msg ? 1 : -1;
	}
	nl = memchr(buf, '\n', len);
	if (nl == NULL)
		return 0;
	*msg = cJSON_ParseWithLength(buf, nl - buf);
	etcd_transfer_consume(watch, nl - buf + 1);
	return *msg ? 1 : -1;
}

/* Look at the whole messages received so far. */
static EtcdWatchEvent
watch_scan(void)
{
	cJSON	   *msg;
	int			r;

	while ((r = watch_next(&msg)) != 0)
	{
		cJSON	   *result;
		cJSON	   *ev;

		if (r < 0)
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
		if (etcd_transfer_done(watch))
		{
			EtcdHttpResult hr;

			etcd_transfer_result(watch, &hr);
			if (hr.error != NULL)
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

static char *
b64_encode(const char *data, int len)
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
	cJSON_AddStringToObject(obj, field, b64_encode(key, strlen(key)));
}

/* ----------------------------------------------------------------
 * Settings
 * ----------------------------------------------------------------
 */

static bool
check_endpoints(char **newval, void **extra, GucSource source)
{
	char	   *copy = pstrdup(*newval);
	char	   *tok;
	char	   *save;
	int			n = 0;

	for (tok = strtok_r(copy, ", \t", &save); tok; tok = strtok_r(NULL, ", \t", &save))
	{
		const char *path;

		if (strncmp(tok, "http://", 7) != 0 && strncmp(tok, "https://", 8) != 0)
		{
			GUC_check_errdetail("Endpoint \"%s\" is not an http:// or https:// URL.", tok);
			pfree(copy);
			return false;
		}

		/*
		 * Paths are appended as "/v3/...".  With a path of its own, etcd 3.5
		 * answers 404 "Not Found" as JSON with code 5, which reads like its
		 * own "lease not found".
		 */
		path = strchr(strstr(tok, "://") + 3, '/');
		if (path != NULL && strspn(path, "/") != strlen(path))
		{
			GUC_check_errdetail("Endpoint \"%s\" has a path; give the scheme, host and port only.", tok);
			pfree(copy);
			return false;
		}
		n++;
	}
	pfree(copy);
	if (n == 0)
	{
		GUC_check_errdetail("At least one endpoint is required.");
		return false;
	}
	return true;
}

/*
 * Assign hooks run on every reload, changed or not, and must not fail: the
 * endpoints are parsed again at the next request.  The variable still holds
 * the old value here.
 */
static void
assign_endpoints(const char *newval, void *extra)
{
	endpoints_stale = true;
	if (endpoints_setting == NULL || strcmp(endpoints_setting, newval) != 0)
	{
		/* a token belongs to one cluster; another etcd may hang on it */
		credentials_changed();

		/*
		 * Pooled connections belong to the old endpoints: libcurl 8 reuses
		 * an https connection for an http:// URL to the same host and port.
		 */
		etcd_tls_changed();
	}
}

/* new credentials: authenticate again at the next request */
static void
credentials_changed(void)
{
	etcd_auth_reset();
	auth_generation++;
}

static void
assign_user(const char *newval, void *extra)
{
	if (auth_user == NULL || strcmp(auth_user, newval) != 0)
		credentials_changed();
}

static void
assign_password_file(const char *newval, void *extra)
{
	if (auth_password_file == NULL || strcmp(auth_password_file, newval) != 0)
		credentials_changed();
}

/* a new transport: pooled connections speak the old one */
static void
assign_transport(int newval, void *extra)
{
	if (newval != transport)
		etcd_tls_changed();
}

void
etcd_client_define_settings(void)
{
	DefineCustomEnumVariable("etcd_lock.transport",
							 "How requests reach etcd: its JSON gateway or its gRPC API.",
							 "gRPC costs etcd about half the CPU per request.",
							 &transport,
							 ETCD_TRANSPORT_JSON,
							 transport_options,
							 PGC_SIGHUP, 0,
							 NULL, assign_transport, NULL);

	DefineCustomStringVariable("etcd_lock.endpoints",
							   "Comma-separated list of etcd client URLs.",
							   "When one does not answer, the next one is tried.",
							   &endpoints_setting,
							   "http://127.0.0.1:2379",
							   PGC_SIGHUP, 0,
							   check_endpoints, assign_endpoints, NULL);

	DefineCustomIntVariable("etcd_lock.request_timeout",
							"Time limit for one request to one etcd endpoint.",
							NULL,
							&etcd_lock_request_timeout,
							2000, 10, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomStringVariable("etcd_lock.user",
							   "etcd user to authenticate as; empty sends no credentials.",
							   NULL,
							   &auth_user,
							   "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY,
							   NULL, assign_user, NULL);

	DefineCustomStringVariable("etcd_lock.password_file",
							   "File holding the password of etcd_lock.user.",
							   "Read at each authentication; one final line end is ignored.",
							   &auth_password_file,
							   "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY,
							   NULL, assign_password_file, NULL);
}
