/*-------------------------------------------------------------------------
 *
 * http.h
 *		  The HTTP driver: libcurl transfers, waited on with PostgreSQL's
 *		  latch, so that every wait reacts to interrupts at once.
 *
 * IDENTIFICATION
 *		  http.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef ETCD_LOCK_HTTP_H
#define ETCD_LOCK_HTTP_H

/* A set of transfers waited on together, and its pool of connections. */
typedef struct EtcdMulti EtcdMulti;

/* One request and its answer; reused from one request to the next. */
typedef struct EtcdTransfer EtcdTransfer;

/*
 * What a process waits for, shown in pg_stat_activity.wait_event: named
 * events on PostgreSQL 17 and later, plain "Extension" before.
 */
typedef enum EtcdWait
{
	ETCD_WAIT_LOCK,				/* EtcdLockWait: a lock held elsewhere */
	ETCD_WAIT_REQUEST,			/* EtcdRequest: an answer from etcd */
	ETCD_WAIT_WORKER,			/* EtcdLeaseWorker: the worker, idle or renewing */
	ETCD_NWAITS
} EtcdWait;

/* How a finished transfer ended. */
typedef struct EtcdHttpResult
{
	int			curl_code;		/* CURLE_OK, or why there is no answer */
	bool		timed_out;		/* no answer within the time limit */
	bool		too_big;		/* the answer was over our size limit */
	long		status;			/* HTTP status, when curl_code is CURLE_OK */
	const char *body;			/* the answer, NUL-terminated */
	size_t		len;
	const char *error;			/* curl's text when curl_code is not OK */
	bool		grpc;			/* it was a gRPC call */
	int			grpc_status;	/* grpc-status, -1 when there was none */
	const char *grpc_message;	/* grpc-message, still percent-encoded */
} EtcdHttpResult;

extern void etcd_http_define_settings(void);
extern int	etcd_tls_generation(void);
extern void etcd_tls_changed(void);

extern EtcdMulti *etcd_multi_create(void);
extern void etcd_multi_destroy(EtcdMulti *m);
extern bool etcd_multi_wait(EtcdMulti *m, long max_wait_ms, EtcdWait what);

extern EtcdTransfer *etcd_transfer_create(void);
extern void etcd_transfer_start(EtcdMulti *m, EtcdTransfer *t, const char *url,
								const char *body, size_t len, const char *token,
								bool grpc, long timeout_ms, long connect_timeout_ms);
extern void etcd_transfer_stop(EtcdMulti *m, EtcdTransfer *t);
extern bool etcd_transfer_done(EtcdTransfer *t);
extern bool etcd_transfer_active(EtcdTransfer *t);
extern void etcd_transfer_result(EtcdTransfer *t, EtcdHttpResult *r);
extern char *etcd_transfer_unread(EtcdTransfer *t, size_t *len);
extern void etcd_transfer_consume(EtcdTransfer *t, size_t n);

extern bool etcd_http_failure_is_ours(int curl_code);
extern void etcd_http_report(int elevel, int curl_code, const char *error,
							 const char *endpoint, const char *context);

#endif							/* ETCD_LOCK_HTTP_H */
