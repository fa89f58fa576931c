/*-------------------------------------------------------------------------
 *
 * grpc.c
 *		  etcd's gRPC wire format for the few calls etcd_lock makes: the
 *		  gateway's JSON requests as protobuf messages in gRPC frames, and
 *		  the answers back as the JSON the gateway would have sent.
 *
 * The rest of the extension speaks the JSON of etcd's gateway: cJSON trees
 * with int64 as decimal strings, bytes as base64, enums by name and zero
 * values left out.  Over gRPC, client.c turns such a request into protobuf
 * here, and the answer back into the same JSON, so that the recipe and the
 * worker read one format whichever transport carried it.  The tables below
 * describe the messages of etcd's rpc.proto and kv.proto that we send or
 * read, with their field numbers; fields we never read are not listed, and
 * are skipped like any unknown field.
 *
 * Decoding is strict about what it reads: a truncated or overlong field, a
 * known field with the wrong wire type, a group, a compressed frame or a
 * message nested too deep is a protocol error.  The HTTP driver caps the
 * size of the whole answer.
 *
 * IDENTIFICATION
 *		  grpc.c
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <ctype.h>

#include "common/base64.h"
#include "lib/stringinfo.h"

#include "grpc.h"

/* Nested messages deeper than this are refused; etcd's answers have 5. */
#define PB_MAX_DEPTH	16

typedef enum PbType
{
	PB_INT64,					/* JSON: decimal string */
	PB_UINT64,					/* JSON: decimal string (member IDs) */
	PB_BOOL,
	PB_ENUM,					/* JSON: the value's name */
	PB_BYTES,					/* JSON: base64 */
	PB_STRING,
	PB_MESSAGE					/* JSON: object */
} PbType;

typedef struct PbMessage PbMessage;

typedef struct PbField
{
	const char *name;			/* as in the .proto, which the gateway uses */
	int			number;
	PbType		type;
	bool		repeated;
	const PbMessage *message;	/* PB_MESSAGE */
	const char *const *enums;	/* PB_ENUM: names by value, NULL-terminated */
} PbField;

struct PbMessage
{
	const PbField *fields;		/* ends with a NULL name */
};

struct EtcdGrpcMethod
{
	const char *gateway_path;
	const char *grpc_path;
	const PbMessage *request;
	const PbMessage *response;
	bool		stream;			/* the gateway wraps each answer in "result" */
};

#define SCALAR(name, number, type) {name, number, type, false, NULL, NULL}
#define ENUM(name, number, names) {name, number, PB_ENUM, false, NULL, names}
#define MESSAGE(name, number, msg) {name, number, PB_MESSAGE, false, &msg, NULL}
#define REPEATED(name, number, msg) {name, number, PB_MESSAGE, true, &msg, NULL}
#define END {NULL, 0, 0, false, NULL, NULL}

static const char *const sort_orders[] = {"NONE", "ASCEND", "DESCEND", NULL};
static const char *const sort_targets[] = {"KEY", "VERSION", "CREATE", "MOD", "VALUE", NULL};
static const char *const compare_results[] = {"EQUAL", "GREATER", "LESS", "NOT_EQUAL", NULL};
static const char *const compare_targets[] = {"VERSION", "CREATE", "MOD", "VALUE", "LEASE", NULL};
static const char *const event_types[] = {"PUT", "DELETE", NULL};
static const char *const watch_filters[] = {"NOPUT", "NODELETE", NULL};

/* etcdserverpb.ResponseHeader */
static const PbField header_fields[] = {
	SCALAR("cluster_id", 1, PB_UINT64), SCALAR("member_id", 2, PB_UINT64),
	SCALAR("revision", 3, PB_INT64), SCALAR("raft_term", 4, PB_UINT64), END
};
static const PbMessage ResponseHeader = {header_fields};

/* mvccpb.KeyValue and mvccpb.Event */
static const PbField kv_fields[] = {
	SCALAR("key", 1, PB_BYTES), SCALAR("create_revision", 2, PB_INT64),
	SCALAR("mod_revision", 3, PB_INT64), SCALAR("version", 4, PB_INT64),
	SCALAR("value", 5, PB_BYTES), SCALAR("lease", 6, PB_INT64), END
};
static const PbMessage KeyValue = {kv_fields};
static const PbField event_fields[] = {
	ENUM("type", 1, event_types), MESSAGE("kv", 2, KeyValue),
	MESSAGE("prev_kv", 3, KeyValue), END
};
static const PbMessage Event = {event_fields};

/* KV requests */
static const PbField range_request_fields[] = {
	SCALAR("key", 1, PB_BYTES), SCALAR("range_end", 2, PB_BYTES),
	SCALAR("limit", 3, PB_INT64), SCALAR("revision", 4, PB_INT64),
	ENUM("sort_order", 5, sort_orders), ENUM("sort_target", 6, sort_targets),
	SCALAR("serializable", 7, PB_BOOL), SCALAR("keys_only", 8, PB_BOOL),
	SCALAR("count_only", 9, PB_BOOL), SCALAR("min_mod_revision", 10, PB_INT64),
	SCALAR("max_mod_revision", 11, PB_INT64),
	SCALAR("min_create_revision", 12, PB_INT64),
	SCALAR("max_create_revision", 13, PB_INT64), END
};
static const PbMessage RangeRequest = {range_request_fields};
static const PbField put_request_fields[] = {
	SCALAR("key", 1, PB_BYTES), SCALAR("value", 2, PB_BYTES),
	SCALAR("lease", 3, PB_INT64), SCALAR("prev_kv", 4, PB_BOOL), END
};
static const PbMessage PutRequest = {put_request_fields};
static const PbField delete_request_fields[] = {
	SCALAR("key", 1, PB_BYTES), SCALAR("range_end", 2, PB_BYTES),
	SCALAR("prev_kv", 3, PB_BOOL), END
};
static const PbMessage DeleteRangeRequest = {delete_request_fields};
static const PbField request_op_fields[] = {
	MESSAGE("request_range", 1, RangeRequest),
	MESSAGE("request_put", 2, PutRequest),
	MESSAGE("request_delete_range", 3, DeleteRangeRequest), END
};
static const PbMessage RequestOp = {request_op_fields};
static const PbField compare_fields[] = {
	ENUM("result", 1, compare_results), ENUM("target", 2, compare_targets),
	SCALAR("key", 3, PB_BYTES), SCALAR("version", 4, PB_INT64),
	SCALAR("create_revision", 5, PB_INT64), SCALAR("mod_revision", 6, PB_INT64),
	SCALAR("value", 7, PB_BYTES), SCALAR("lease", 8, PB_INT64),
	SCALAR("range_end", 64, PB_BYTES), END
};
static const PbMessage Compare = {compare_fields};
static const PbField txn_request_fields[] = {
	REPEATED("compare", 1, Compare), REPEATED("success", 2, RequestOp),
	REPEATED("failure", 3, RequestOp), END
};
static const PbMessage TxnRequest = {txn_request_fields};

/* KV responses */
static const PbField range_response_fields[] = {
	MESSAGE("header", 1, ResponseHeader), REPEATED("kvs", 2, KeyValue),
	SCALAR("more", 3, PB_BOOL), SCALAR("count", 4, PB_INT64), END
};
static const PbMessage RangeResponse = {range_response_fields};
static const PbField put_response_fields[] = {
	MESSAGE("header", 1, ResponseHeader), MESSAGE("prev_kv", 2, KeyValue), END
};
static const PbMessage PutResponse = {put_response_fields};
static const PbField delete_response_fields[] = {
	MESSAGE("header", 1, ResponseHeader), SCALAR("deleted", 2, PB_INT64),
	REPEATED("prev_kvs", 3, KeyValue), END
};
static const PbMessage DeleteRangeResponse = {delete_response_fields};
static const PbField response_op_fields[] = {
	MESSAGE("response_range", 1, RangeResponse),
	MESSAGE("response_put", 2, PutResponse),
	MESSAGE("response_delete_range", 3, DeleteRangeResponse), END
};
static const PbMessage ResponseOp = {response_op_fields};
static const PbField txn_response_fields[] = {
	MESSAGE("header", 1, ResponseHeader), SCALAR("succeeded", 2, PB_BOOL),
	REPEATED("responses", 3, ResponseOp), END
};
static const PbMessage TxnResponse = {txn_response_fields};

/* Watch */
static const PbField watch_create_fields[] = {
	SCALAR("key", 1, PB_BYTES), SCALAR("range_end", 2, PB_BYTES),
	SCALAR("start_revision", 3, PB_INT64), SCALAR("progress_notify", 4, PB_BOOL),
	{"filters", 5, PB_ENUM, true, NULL, watch_filters},
	SCALAR("prev_kv", 6, PB_BOOL), END
};
static const PbMessage WatchCreateRequest = {watch_create_fields};
static const PbField watch_request_fields[] = {
	MESSAGE("create_request", 1, WatchCreateRequest), END
};
static const PbMessage WatchRequest = {watch_request_fields};
static const PbField watch_response_fields[] = {
	MESSAGE("header", 1, ResponseHeader), SCALAR("watch_id", 2, PB_INT64),
	SCALAR("created", 3, PB_BOOL), SCALAR("canceled", 4, PB_BOOL),
	SCALAR("compact_revision", 5, PB_INT64), SCALAR("cancel_reason", 6, PB_STRING),
	SCALAR("fragment", 7, PB_BOOL), REPEATED("events", 11, Event), END
};
static const PbMessage WatchResponse = {watch_response_fields};

/* Lease */
static const PbField lease_grant_request_fields[] = {
	SCALAR("TTL", 1, PB_INT64), SCALAR("ID", 2, PB_INT64), END
};
static const PbMessage LeaseGrantRequest = {lease_grant_request_fields};
static const PbField lease_grant_response_fields[] = {
	MESSAGE("header", 1, ResponseHeader), SCALAR("ID", 2, PB_INT64),
	SCALAR("TTL", 3, PB_INT64), SCALAR("error", 4, PB_STRING), END
};
static const PbMessage LeaseGrantResponse = {lease_grant_response_fields};
static const PbField lease_id_fields[] = {SCALAR("ID", 1, PB_INT64), END};
static const PbMessage LeaseIdRequest = {lease_id_fields};	/* revoke, keepalive */
static const PbField header_only_fields[] = {MESSAGE("header", 1, ResponseHeader), END};
static const PbMessage HeaderOnly = {header_only_fields};	/* revoke's answer */
static const PbField keepalive_response_fields[] = {
	MESSAGE("header", 1, ResponseHeader), SCALAR("ID", 2, PB_INT64),
	SCALAR("TTL", 3, PB_INT64), END
};
static const PbMessage LeaseKeepAliveResponse = {keepalive_response_fields};

/* Auth and Maintenance */
static const PbField authenticate_request_fields[] = {
	SCALAR("name", 1, PB_STRING), SCALAR("password", 2, PB_STRING), END
};
static const PbMessage AuthenticateRequest = {authenticate_request_fields};
static const PbField authenticate_response_fields[] = {
	MESSAGE("header", 1, ResponseHeader), SCALAR("token", 2, PB_STRING), END
};
static const PbMessage AuthenticateResponse = {authenticate_response_fields};
static const PbField empty_fields[] = {END};
static const PbMessage Empty = {empty_fields};
static const PbField status_response_fields[] = {
	MESSAGE("header", 1, ResponseHeader), SCALAR("version", 2, PB_STRING),
	SCALAR("dbSize", 3, PB_INT64), SCALAR("leader", 4, PB_UINT64),
	SCALAR("raftIndex", 5, PB_UINT64), SCALAR("raftTerm", 6, PB_UINT64), END
};
static const PbMessage StatusResponse = {status_response_fields};

static const EtcdGrpcMethod methods[] = {
	{"/v3/kv/txn", "/etcdserverpb.KV/Txn", &TxnRequest, &TxnResponse, false},
	{"/v3/kv/deleterange", "/etcdserverpb.KV/DeleteRange",
	&DeleteRangeRequest, &DeleteRangeResponse, false},
	{"/v3/lease/grant", "/etcdserverpb.Lease/LeaseGrant",
	&LeaseGrantRequest, &LeaseGrantResponse, false},
	{"/v3/lease/revoke", "/etcdserverpb.Lease/LeaseRevoke",
	&LeaseIdRequest, &HeaderOnly, false},
	{"/v3/lease/keepalive", "/etcdserverpb.Lease/LeaseKeepAlive",
	&LeaseIdRequest, &LeaseKeepAliveResponse, true},
	{"/v3/watch", "/etcdserverpb.Watch/Watch", &WatchRequest, &WatchResponse, true},
	{"/v3/auth/authenticate", "/etcdserverpb.Auth/Authenticate",
	&AuthenticateRequest, &AuthenticateResponse, false},
	{"/v3/maintenance/status", "/etcdserverpb.Maintenance/Status",
	&Empty, &StatusResponse, false},
};

static void encode_message(StringInfo buf, const PbMessage *m, cJSON *obj);
static bool decode_message(const PbMessage *m, const uint8 *p, size_t len,
						   cJSON *obj, int depth, char **error);

/* The method for a gateway path; every path we send has one. */
const EtcdGrpcMethod *
etcd_grpc_method(const char *gateway_path)
{
	int			i;

	for (i = 0; i < lengthof(methods); i++)
		if (strcmp(methods[i].gateway_path, gateway_path) == 0)
			return &methods[i];
	elog(ERROR, "no gRPC method for etcd request %s", gateway_path);
	return NULL;
}

const char *
etcd_grpc_path(const EtcdGrpcMethod *m)
{
	return m->grpc_path;
}

/* ----------------------------------------------------------------
 * Encoding: a request's JSON into a gRPC frame
 * ----------------------------------------------------------------
 */

static void
put_varint(StringInfo buf, uint64 v)
{
	while (v >= 0x80)
	{
		appendStringInfoChar(buf, (char) ((v & 0x7f) | 0x80));
		v >>= 7;
	}
	appendStringInfoChar(buf, (char) v);
}

static void
put_tag(StringInfo buf, int number, int wire_type)
{
	put_varint(buf, ((uint64) number << 3) | wire_type);
}

static void
put_bytes(StringInfo buf, int number, const char *data, size_t len)
{
	put_tag(buf, number, 2);
	put_varint(buf, len);
	appendBinaryStringInfo(buf, data, len);
}

/* Our own requests are built right; anything else is a bug here. */
static void
bad_request(const PbField *f)
{
	elog(ERROR, "cannot encode field \"%s\" of an etcd gRPC request", f->name);
}

/* A varint-encoded value of a field, from its JSON. */
static uint64
scalar_value(const PbField *f, cJSON *v)
{
	if (f->type == PB_BOOL)
		return cJSON_IsTrue(v) ? 1 : 0;
	if (f->type == PB_ENUM && cJSON_IsString(v))
	{
		int			i;

		for (i = 0; f->enums[i] != NULL; i++)
			if (strcmp(f->enums[i], v->valuestring) == 0)
				return i;
	}
	if (cJSON_IsNumber(v))
		return (uint64) (int64) v->valuedouble;
	if ((f->type == PB_INT64 || f->type == PB_UINT64) && cJSON_IsString(v))
	{
		char	   *end;
		uint64		n;

		errno = 0;
		n = f->type == PB_INT64 ? (uint64) strtoll(v->valuestring, &end, 10) :
			strtoull(v->valuestring, &end, 10);
		if (errno == 0 && *end == '\0' && end != v->valuestring)
			return n;
	}
	bad_request(f);
	return 0;
}

static void
encode_value(StringInfo buf, const PbField *f, cJSON *v)
{
	switch (f->type)
	{
		case PB_INT64:
		case PB_UINT64:
		case PB_BOOL:
		case PB_ENUM:
			put_tag(buf, f->number, 0);
			put_varint(buf, scalar_value(f, v));
			break;
		case PB_STRING:
			if (!cJSON_IsString(v))
				bad_request(f);
			put_bytes(buf, f->number, v->valuestring, strlen(v->valuestring));
			break;
		case PB_BYTES:
			{
				int			inlen;
				int			n;
				char	   *raw;

				if (!cJSON_IsString(v))
					bad_request(f);
				inlen = strlen(v->valuestring);
				raw = palloc(pg_b64_dec_len(inlen) + 1);
				n = pg_b64_decode(v->valuestring, inlen, raw, pg_b64_dec_len(inlen));
				if (n < 0)
					bad_request(f);
				put_bytes(buf, f->number, raw, n);
				pfree(raw);
				break;
			}
		case PB_MESSAGE:
			{
				StringInfoData sub;

				initStringInfo(&sub);
				encode_message(&sub, f->message, v);
				put_bytes(buf, f->number, sub.data, sub.len);
				pfree(sub.data);
				break;
			}
	}
}

static void
encode_message(StringInfo buf, const PbMessage *m, cJSON *obj)
{
	cJSON	   *item;

	cJSON_ArrayForEach(item, obj)
	{
		const PbField *f;

		for (f = m->fields; f->name != NULL; f++)
			if (strcmp(f->name, item->string) == 0)
				break;
		if (f->name == NULL)
			elog(ERROR, "etcd gRPC request has unknown field \"%s\"", item->string);

		if (f->repeated && f->type == PB_ENUM)
		{
			/* repeated scalars are packed in proto3: one run of varints */
			StringInfoData packed;
			cJSON	   *v;

			initStringInfo(&packed);
			cJSON_ArrayForEach(v, item)
				put_varint(&packed, scalar_value(f, v));
			put_bytes(buf, f->number, packed.data, packed.len);
			pfree(packed.data);
		}
		else if (f->repeated)
		{
			cJSON	   *v;

			cJSON_ArrayForEach(v, item)
				encode_value(buf, f, v);
		}
		else
			encode_value(buf, f, item);
	}
}

/*
 * The request as one gRPC frame: a byte saying "not compressed", the
 * message's length in 4 bytes, big-endian, then the message.
 */
char *
etcd_grpc_encode(const EtcdGrpcMethod *m, cJSON *req, size_t *len)
{
	StringInfoData buf;
	uint32		n;

	initStringInfo(&buf);
	appendBinaryStringInfo(&buf, "\0\0\0\0\0", 5);
	encode_message(&buf, m->request, req);
	n = buf.len - 5;
	buf.data[1] = (char) (n >> 24);
	buf.data[2] = (char) (n >> 16);
	buf.data[3] = (char) (n >> 8);
	buf.data[4] = (char) n;
	*len = buf.len;
	return buf.data;
}

/* ----------------------------------------------------------------
 * Decoding: frames, then a message into the gateway's JSON
 * ----------------------------------------------------------------
 */

/*
 * The next frame of buf[0..len): returns 1 and sets msg, msglen and framelen
 * (bytes to consume) when a whole frame is there, 0 when more must come, -1
 * (with *error) when the frame is malformed.
 */
int
etcd_grpc_next_frame(const char *buf, size_t len, const char **msg,
					 size_t *msglen, size_t *framelen, char **error)
{
	const uint8 *p = (const uint8 *) buf;
	uint32		n;

	if (len < 5)
		return 0;
	if (p[0] != 0)
	{
		/* we never offer compression, so etcd must not use it */
		*error = psprintf("The gRPC frame is flagged %d; only 0, uncompressed, is expected.",
						  p[0]);
		return -1;
	}
	n = ((uint32) p[1] << 24) | ((uint32) p[2] << 16) | ((uint32) p[3] << 8) | p[4];
	if (len - 5 < n)
		return 0;
	*msg = buf + 5;
	*msglen = n;
	*framelen = (size_t) n + 5;
	return 1;
}

static bool
get_varint(const uint8 **p, const uint8 *end, uint64 *v)
{
	int			shift;

	*v = 0;
	for (shift = 0; shift < 64 && *p < end; shift += 7)
	{
		uint8		b = *(*p)++;

		*v |= (uint64) (b & 0x7f) << shift;
		if ((b & 0x80) == 0)
			return true;
	}
	return false;
}

/* Set name in obj, or append to its array when the field is repeated. */
static void
add_value(cJSON *obj, const PbField *f, cJSON *v)
{
	if (f->repeated)
	{
		cJSON	   *array = cJSON_GetObjectItemCaseSensitive(obj, f->name);

		if (array == NULL)
			array = cJSON_AddArrayToObject(obj, f->name);
		cJSON_AddItemToArray(array, v);
	}
	else if (cJSON_GetObjectItemCaseSensitive(obj, f->name) != NULL)
		cJSON_ReplaceItemInObjectCaseSensitive(obj, f->name, v);	/* last wins */
	else
		cJSON_AddItemToObject(obj, f->name, v);
}

static cJSON *
varint_json(const PbField *f, uint64 v)
{
	char		num[32];

	switch (f->type)
	{
		case PB_BOOL:
			return cJSON_CreateBool(v != 0);
		case PB_ENUM:
			{
				int			i;

				for (i = 0; f->enums[i] != NULL; i++)
					if (i == v)
						return cJSON_CreateString(f->enums[i]);
				/* a value newer than our table: the gateway prints the number */
				return cJSON_CreateNumber((double) v);
			}
		case PB_UINT64:
			snprintf(num, sizeof(num), UINT64_FORMAT, v);
			return cJSON_CreateString(num);
		default:
			snprintf(num, sizeof(num), INT64_FORMAT, (int64) v);
			return cJSON_CreateString(num);
	}
}

static bool
malformed(char **error, const char *what, int number)
{
	*error = psprintf("Field %d of the protobuf message %s.", number, what);
	return false;
}

static bool
decode_message(const PbMessage *m, const uint8 *p, size_t len, cJSON *obj,
			   int depth, char **error)
{
	const uint8 *end = p + len;

	if (depth > PB_MAX_DEPTH)
	{
		*error = psprintf("The protobuf message is nested more than %d deep.", PB_MAX_DEPTH);
		return false;
	}
	while (p < end)
	{
		uint64		tag;
		uint64		v;
		int			number;
		int			wire_type;
		const PbField *f;

		if (!get_varint(&p, end, &tag))
		{
			*error = pstrdup("The protobuf message ends inside a field's tag.");
			return false;
		}
		number = (int) (tag >> 3);
		wire_type = (int) (tag & 7);
		if (tag >> 3 == 0 || tag >> 3 > 536870911)
		{
			*error = pstrdup("The protobuf message has a field number out of range.");
			return false;
		}
		for (f = m->fields; f->name != NULL; f++)
			if (f->number == number)
				break;
		if (f->name == NULL)
			f = NULL;			/* unknown: skipped */

		switch (wire_type)
		{
			case 0:
				if (!get_varint(&p, end, &v))
					return malformed(error, "is a truncated varint", number);
				if (f != NULL && (f->type == PB_STRING || f->type == PB_BYTES ||
								  f->type == PB_MESSAGE))
					return malformed(error, "has the wrong wire type", number);
				if (f != NULL)
					add_value(obj, f, varint_json(f, v));
				break;
			case 1:
			case 5:
				{
					size_t		n = wire_type == 1 ? 8 : 4;

					if (f != NULL)
						return malformed(error, "has the wrong wire type", number);
					if ((size_t) (end - p) < n)
						return malformed(error, "is truncated", number);
					p += n;
					break;
				}
			case 2:
				{
					const uint8 *data;

					if (!get_varint(&p, end, &v))
						return malformed(error, "has a truncated length", number);
					if (v > (uint64) (end - p))
						return malformed(error, "is longer than the message", number);
					data = p;
					p += v;
					if (f == NULL)
						break;
					if (f->type == PB_MESSAGE)
					{
						cJSON	   *child = cJSON_CreateObject();

						add_value(obj, f, child);
						if (!decode_message(f->message, data, v, child, depth + 1, error))
							return false;
					}
					else if (f->type == PB_BYTES)
					{
						int			enclen = pg_b64_enc_len((int) v);
						char	   *b64 = palloc(enclen + 1);
						int			n = pg_b64_encode((const char *) data, (int) v, b64, enclen);

						if (n < 0)
							return malformed(error, "cannot be encoded", number);
						b64[n] = '\0';
						add_value(obj, f, cJSON_CreateString(b64));
						pfree(b64);
					}
					else if (f->type == PB_STRING)
					{
						if (memchr(data, '\0', v) != NULL)
							return malformed(error, "has a NUL byte in a string", number);
						add_value(obj, f, cJSON_CreateString(pnstrdup((const char *) data, v)));
					}
					else
					{
						/* a packed run of varints */
						const uint8 *q = data;

						while (q < data + v)
						{
							if (!get_varint(&q, data + v, &tag))
								return malformed(error, "has a truncated packed varint", number);
							add_value(obj, f, varint_json(f, tag));
						}
					}
					break;
				}
			default:
				return malformed(error, "has an unsupported wire type", number);
		}
	}
	return true;
}

/*
 * One message as the gateway's JSON; streamed calls wrap it in "result" as
 * the gateway does.  NULL, with *error, when it is malformed.
 */
cJSON *
etcd_grpc_decode(const EtcdGrpcMethod *m, const char *msg, size_t len,
				 char **error)
{
	cJSON	   *obj = cJSON_CreateObject();

	if (!decode_message(m->response, (const uint8 *) msg, len, obj, 0, error))
		return NULL;
	if (m->stream)
	{
		cJSON	   *wrapped = cJSON_CreateObject();

		cJSON_AddItemToObject(wrapped, "result", obj);
		return wrapped;
	}
	return obj;
}

/*
 * The HTTP status the gateway gives a gRPC status code (grpc-gateway's
 * table), so that both transports decide alike: 401 authenticates again,
 * 5xx tries another member.
 */
int
etcd_grpc_http_status(int code)
{
	switch (code)
	{
		case 0:
			return 200;
		case 1:					/* Canceled */
			return 408;
		case 3:					/* InvalidArgument */
		case 9:					/* FailedPrecondition */
		case 11:				/* OutOfRange */
			return 400;
		case 4:					/* DeadlineExceeded */
			return 504;
		case 5:					/* NotFound */
			return 404;
		case 6:					/* AlreadyExists */
		case 10:				/* Aborted */
			return 409;
		case 7:					/* PermissionDenied */
			return 403;
		case 8:					/* ResourceExhausted */
			return 429;
		case 12:				/* Unimplemented */
			return 501;
		case 14:				/* Unavailable */
			return 503;
		case 16:				/* Unauthenticated */
			return 401;
		default:				/* Unknown, Internal, DataLoss, and newer */
			return 500;
	}
}

/* grpc-message is percent-encoded: decode it for people to read. */
char *
etcd_grpc_message(const char *s)
{
	StringInfoData buf;

	initStringInfo(&buf);
	for (; *s; s++)
	{
		if (s[0] == '%' && isxdigit((unsigned char) s[1]) && isxdigit((unsigned char) s[2]))
		{
			char		hex[3] = {s[1], s[2], '\0'};

			appendStringInfoChar(&buf, (char) strtol(hex, NULL, 16));
			s += 2;
		}
		else
			appendStringInfoChar(&buf, *s);
	}
	return buf.data;
}
