/*-------------------------------------------------------------------------
 *
 * grpc.h
 *		  etcd's gRPC wire format: the gateway's JSON requests as protobuf
 *		  messages in gRPC frames, and the answers back as the same JSON.
 *
 * IDENTIFICATION
 *		  grpc.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef ETCD_LOCK_GRPC_H
#define ETCD_LOCK_GRPC_H

#include <cjson/cJSON.h>

/* One of etcd's gRPC methods that we call. */
typedef struct EtcdGrpcMethod EtcdGrpcMethod;

extern const EtcdGrpcMethod *etcd_grpc_method(const char *gateway_path);
extern const char *etcd_grpc_path(const EtcdGrpcMethod *m);
extern char *etcd_grpc_encode(const EtcdGrpcMethod *m, cJSON *req, size_t *len);
extern int	etcd_grpc_next_frame(const char *buf, size_t len, const char **msg,
								 size_t *msglen, size_t *framelen, char **error);
extern cJSON *etcd_grpc_decode(const EtcdGrpcMethod *m, const char *msg,
							   size_t len, char **error);
extern int	etcd_grpc_http_status(int code);
extern char *etcd_grpc_message(const char *percent_encoded);

#endif							/* ETCD_LOCK_GRPC_H */
