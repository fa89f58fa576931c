/*-------------------------------------------------------------------------
 *
 * client.h
 *		  The etcd client: requests to etcd's JSON gateway with failover
 *		  and authentication, etcd's errors as SQLSTATEs, and the watch.
 *
 * IDENTIFICATION
 *		  client.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef ETCD_LOCK_CLIENT_H
#define ETCD_LOCK_CLIENT_H

#include <cjson/cJSON.h>

#include "datatype/timestamp.h"

#include "http.h"

/* etcd_lock.request_timeout, in ms */
extern int	etcd_lock_request_timeout;

/* One answer from etcd, or the reason there is none. */
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
	int			curl_code;		/* the driver's code, for transport errors */
	bool		timed_out;		/* no answer within the request's time limit */
	bool		auth_failed;	/* authenticating, not the request, failed */
	bool		password_failed;	/* etcd_lock.password_file was unusable */
	bool		password_opened;	/* ... but could be opened */
	int			password_errno; /* ... and why; 0: too long */
} EtcdResult;

extern void etcd_client_define_settings(void);

/* the members, in the order to try them */
extern int	etcd_endpoint_count(void);
extern const char *etcd_endpoint(int i);
extern int	etcd_endpoint_order(int *order);
extern void etcd_endpoint_failed(int idx);
extern void etcd_endpoint_ok(int idx);

/* requests from a backend, waiting interruptibly */
extern TimestampTz etcd_set_deadline(TimestampTz deadline);
extern bool etcd_request(const char *path, cJSON *req, EtcdResult *res);
extern bool etcd_request_endpoint(int idx, const char *path, cJSON *req,
								  EtcdResult *res);
extern cJSON *etcd_call(const char *path, cJSON *req);
extern void etcd_report(int elevel, const char *path, EtcdResult *res);

/* for a process that drives transfers of its own (the worker) */
extern char *etcd_request_body(const char *path, cJSON *req, size_t *len);
extern void etcd_transfer_begin(EtcdMulti *m, EtcdTransfer *t, int idx,
								const char *path, const char *body, size_t len,
								const char *token, long timeout_ms);
extern bool etcd_result_read(EtcdTransfer *t, const char *path, EtcdResult *res);
extern bool etcd_auth_wanted(void);
extern const char *etcd_auth_token(void);
extern char *etcd_auth_body(EtcdResult *res, size_t *len);
extern int	etcd_auth_generation(void);
extern bool etcd_auth_accept(bool ok, EtcdResult *res);
extern void etcd_auth_reset(void);

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

/* etcd's JSON: int64 as strings, keys as base64 */
extern bool etcd_json_get_int64(cJSON *obj, const char *field, int64 *out);
extern int64 etcd_json_int64(cJSON *obj, const char *field);
extern int64 etcd_json_need_int64(cJSON *obj, const char *field, const char *path);
extern cJSON *etcd_json_get(cJSON *obj, const char *path);
extern void etcd_json_add_int64(cJSON *obj, const char *field, int64 value);
extern void etcd_json_add_key(cJSON *obj, const char *field, const char *key);
extern char *etcd_unb64(const char *b64, int *len);

#endif							/* ETCD_LOCK_CLIENT_H */
