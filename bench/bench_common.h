/*
 * bench_common.h: shared helpers of bench/floor.c and bench/gostyle.c.
 *
 * Both drivers run one thread per client for a fixed time, time every
 * lock+unlock pair, and print one machine-readable line:
 *
 *   RESULT ops=N secs=S ops_s=X p50_ms=Y p99_ms=Z errors=E conns=C requests=R cpu_ms_per_op=U
 *
 * conns is the number of TCP connections curl opened (CURLINFO_NUM_CONNECTS
 * summed over all requests), requests the number of HTTP requests sent,
 * cpu_ms_per_op this process's CPU time (user + system) per pair.
 */
#ifndef BENCH_COMMON_H
#define BENCH_COMMON_H

#include <curl/curl.h>
#include <cjson/cJSON.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/resource.h>

typedef struct Opts
{
	const char *url;			/* http(s)://127.0.0.1:PORT */
	int			clients;
	double		secs;
	const char *prefix;			/* lock names are PREFIX<client> */
	const char *cacert;
	const char *cert;
	const char *key;
	int			ttl;
	int			keepalive;		/* gostyle: also send the session's first keepalive */
} Opts;

static Opts opts = {NULL, 1, 5.0, "bench/", NULL, NULL, NULL, 0, 0};

static double
now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* ---- per-thread state ---- */

typedef struct Buf
{
	char	   *p;
	size_t		len;
	size_t		cap;
} Buf;

typedef struct Thread
{
	pthread_t	tid;
	int			id;
	double	   *lat;			/* seconds per lock+unlock pair */
	size_t		nlat;
	size_t		caplat;
	long		errors;
	long		conns;
	long		requests;
	double		t_end;
	char		err[512];
	Buf			body;
	struct curl_slist *headers;
} Thread;

static void
lat_add(Thread *t, double v)
{
	if (t->nlat == t->caplat)
	{
		t->caplat = t->caplat ? t->caplat * 2 : 4096;
		t->lat = realloc(t->lat, t->caplat * sizeof(double));
		if (!t->lat)
		{
			perror("realloc");
			exit(2);
		}
	}
	t->lat[t->nlat++] = v;
}

static size_t
write_cb(char *ptr, size_t size, size_t nmemb, void *ud)
{
	Buf		   *b = ud;
	size_t		n = size * nmemb;

	if (b->len + n + 1 > b->cap)
	{
		b->cap = (b->len + n + 1) * 2;
		b->p = realloc(b->p, b->cap);
		if (!b->p)
			return 0;
	}
	memcpy(b->p + b->len, ptr, n);
	b->len += n;
	b->p[b->len] = '\0';
	return n;
}

/* A new easy handle, set up the way etcd_lock's http.c sets up its own. */
static CURL *
new_handle(Thread *t)
{
	CURL	   *e = curl_easy_init();

	if (!e)
	{
		fprintf(stderr, "curl_easy_init failed\n");
		exit(2);
	}
	if (!t->headers)
	{
		t->headers = curl_slist_append(NULL, "Content-Type: application/json");
		t->headers = curl_slist_append(t->headers, "Expect:");
	}
	curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, write_cb);
	curl_easy_setopt(e, CURLOPT_WRITEDATA, &t->body);
	curl_easy_setopt(e, CURLOPT_HTTPHEADER, t->headers);
	curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L);
	curl_easy_setopt(e, CURLOPT_TCP_NODELAY, 1L);
	curl_easy_setopt(e, CURLOPT_POST, 1L);
	curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, 5000L);
	if (opts.cacert)
		curl_easy_setopt(e, CURLOPT_CAINFO, opts.cacert);
	if (opts.cert)
		curl_easy_setopt(e, CURLOPT_SSLCERT, opts.cert);
	if (opts.key)
		curl_easy_setopt(e, CURLOPT_SSLKEY, opts.key);
	return e;
}

/*
 * POST body to url+path; returns the parsed JSON of a 200 answer, or NULL
 * (with t->err set).  The caller frees the JSON.
 */
static cJSON *
post(Thread *t, CURL *e, const char *path, const char *body)
{
	char		url[512];
	CURLcode	rc;
	long		status = 0;
	long		nconn = 0;
	cJSON	   *json;

	snprintf(url, sizeof(url), "%s%s", opts.url, path);
	t->body.len = 0;
	if (t->body.p)
		t->body.p[0] = '\0';
	curl_easy_setopt(e, CURLOPT_URL, url);
	curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE, (long) strlen(body));
	curl_easy_setopt(e, CURLOPT_POSTFIELDS, body);
	rc = curl_easy_perform(e);
	t->requests++;
	curl_easy_getinfo(e, CURLINFO_NUM_CONNECTS, &nconn);
	t->conns += nconn;
	if (rc != CURLE_OK)
	{
		snprintf(t->err, sizeof(t->err), "%s: curl: %s", path, curl_easy_strerror(rc));
		return NULL;
	}
	curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &status);
	if (status != 200)
	{
		snprintf(t->err, sizeof(t->err), "%s: HTTP %ld: %.300s", path, status,
				 t->body.p ? t->body.p : "");
		return NULL;
	}
	json = cJSON_Parse(t->body.p ? t->body.p : "");
	if (!json)
		snprintf(t->err, sizeof(t->err), "%s: not JSON: %.300s", path,
				 t->body.p ? t->body.p : "");
	return json;
}

/* etcd sends int64 as strings and leaves zero values out. */
static int64_t
jint(cJSON *obj, const char *field)
{
	cJSON	   *item = cJSON_GetObjectItemCaseSensitive(obj, field);

	if (cJSON_IsString(item))
		return strtoll(item->valuestring, NULL, 10);
	if (cJSON_IsNumber(item))
		return (int64_t) item->valuedouble;
	return 0;
}

static void
b64(const char *in, char *out)
{
	static const char tab[] =
		"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
	size_t		n = strlen(in);
	size_t		i;
	char	   *o = out;

	for (i = 0; i + 2 < n; i += 3)
	{
		unsigned	v = ((unsigned char) in[i] << 16) | ((unsigned char) in[i + 1] << 8) |
			(unsigned char) in[i + 2];

		*o++ = tab[(v >> 18) & 63];
		*o++ = tab[(v >> 12) & 63];
		*o++ = tab[(v >> 6) & 63];
		*o++ = tab[v & 63];
	}
	if (i < n)
	{
		unsigned	v = (unsigned char) in[i] << 16;

		if (i + 1 < n)
			v |= (unsigned char) in[i + 1] << 8;
		*o++ = tab[(v >> 18) & 63];
		*o++ = tab[(v >> 12) & 63];
		*o++ = (i + 1 < n) ? tab[(v >> 6) & 63] : '=';
		*o++ = '=';
	}
	*o = '\0';
}

/* The end of the range of keys starting with pfx (pfx ends in '/'). */
static void
prefix_end(const char *pfx, char *out)
{
	size_t		n = strlen(pfx);

	strcpy(out, pfx);
	out[n - 1]++;				/* '/' + 1 == '0' */
}

static int
cmp_double(const void *a, const void *b)
{
	double		x = *(const double *) a,
				y = *(const double *) b;

	return (x > y) - (x < y);
}

static double
pct(double *v, size_t n, double p)
{
	size_t		i;

	if (n == 0)
		return 0;
	i = (size_t) (p * (n - 1) + 0.5);
	return v[i];
}

static void
usage(const char *prog)
{
	fprintf(stderr,
			"usage: %s --url URL [--clients N] [--secs S] [--prefix P] [--ttl T]\n"
			"          [--cacert F --cert F --key F] [--keepalive]\n", prog);
	exit(2);
}

static void
parse_args(int argc, char **argv)
{
	int			i;

	for (i = 1; i < argc; i++)
	{
		const char *a = argv[i];
		const char *v = (i + 1 < argc) ? argv[i + 1] : NULL;

		if (strcmp(a, "--keepalive") == 0)
		{
			opts.keepalive = 1;
			continue;
		}
		if (!v)
			usage(argv[0]);
		if (strcmp(a, "--url") == 0)
			opts.url = v;
		else if (strcmp(a, "--clients") == 0)
			opts.clients = atoi(v);
		else if (strcmp(a, "--secs") == 0)
			opts.secs = atof(v);
		else if (strcmp(a, "--prefix") == 0)
			opts.prefix = v;
		else if (strcmp(a, "--ttl") == 0)
			opts.ttl = atoi(v);
		else if (strcmp(a, "--cacert") == 0)
			opts.cacert = v;
		else if (strcmp(a, "--cert") == 0)
			opts.cert = v;
		else if (strcmp(a, "--key") == 0)
			opts.key = v;
		else
			usage(argv[0]);
		i++;
	}
	if (!opts.url || opts.clients < 1 || opts.secs <= 0)
		usage(argv[0]);
}

/* ---- the run ---- */

static pthread_barrier_t start_barrier;	/* every thread has set up */
static pthread_barrier_t go_barrier;	/* t_start and t_deadline are set */
static double t_start;
static double t_deadline;

static void *thread_main(void *arg);

static void
wait_for_start(void)
{
	pthread_barrier_wait(&start_barrier);
	pthread_barrier_wait(&go_barrier);
}

/*
 * Start the threads, wait for them, print the RESULT line.  Exit status 1
 * if any pair failed.  Each thread does its set-up, then calls
 * wait_for_start(), then loops until now_s() >= t_deadline.
 */
static int
run_threads(void)
{
	Thread	   *th = calloc(opts.clients, sizeof(Thread));
	double	   *all;
	size_t		n = 0;
	long		errors = 0,
				conns = 0,
				requests = 0;
	double		t_end = 0;
	double		cpu;
	struct rusage ru;
	int			i;

	curl_global_init(CURL_GLOBAL_DEFAULT);
	pthread_barrier_init(&start_barrier, NULL, opts.clients + 1);
	pthread_barrier_init(&go_barrier, NULL, opts.clients + 1);
	for (i = 0; i < opts.clients; i++)
	{
		th[i].id = i;
		if (pthread_create(&th[i].tid, NULL, thread_main, &th[i]) != 0)
		{
			perror("pthread_create");
			return 2;
		}
	}
	/* every thread has done its set-up (e.g. its lease grant) */
	pthread_barrier_wait(&start_barrier);
	t_start = now_s();
	t_deadline = t_start + opts.secs;
	pthread_barrier_wait(&go_barrier);
	for (i = 0; i < opts.clients; i++)
	{
		pthread_join(th[i].tid, NULL);
		n += th[i].nlat;
		errors += th[i].errors;
		conns += th[i].conns;
		requests += th[i].requests;
		if (th[i].t_end > t_end)
			t_end = th[i].t_end;
		if (th[i].err[0])
			fprintf(stderr, "client %d: last error: %s\n", i, th[i].err);
	}
	all = malloc((n ? n : 1) * sizeof(double));
	n = 0;
	for (i = 0; i < opts.clients; i++)
	{
		memcpy(all + n, th[i].lat, th[i].nlat * sizeof(double));
		n += th[i].nlat;
	}
	qsort(all, n, sizeof(double), cmp_double);
	getrusage(RUSAGE_SELF, &ru);
	cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
	printf("RESULT ops=%zu secs=%.3f ops_s=%.1f p50_ms=%.3f p99_ms=%.3f errors=%ld conns=%ld requests=%ld cpu_ms_per_op=%.3f\n",
		   n, t_end - t_start, n / (t_end - t_start),
		   pct(all, n, 0.50) * 1000, pct(all, n, 0.99) * 1000, errors, conns, requests,
		   n ? cpu * 1000 / n : 0.0);
	return (errors > 0 || n == 0) ? 1 : 0;
}

#endif
