/*
 * t/fault_shim.c: an LD_PRELOAD shim for t/015_callback_faults.pl.
 *
 * Wraps libcurl's curl_multi_add_handle: while the file named by the
 * environment variable ETCD_LOCK_FAULT_FILE exists, it returns
 * CURLM_OUT_OF_MEMORY without calling libcurl, so no etcd request can be
 * started; otherwise it calls through.  The test builds it with
 *   cc -shared -fPIC -o fault_shim.so t/fault_shim.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <unistd.h>
#include <curl/curl.h>

typedef CURLMcode (*add_handle_fn) (CURLM *multi, CURL *easy);

CURLMcode
curl_multi_add_handle(CURLM *multi, CURL *easy)
{
	static add_handle_fn real = NULL;
	const char *fault = getenv("ETCD_LOCK_FAULT_FILE");

	if (fault != NULL && access(fault, F_OK) == 0)
		return CURLM_OUT_OF_MEMORY;

	/* looked up at the first call, when libcurl is loaded (with etcd_lock.so) */
	if (real == NULL)
		real = (add_handle_fn) dlsym(RTLD_NEXT, "curl_multi_add_handle");
	if (real == NULL)
	{
		void	   *curl = dlopen("libcurl.so.4", RTLD_NOW | RTLD_NOLOAD);

		if (curl != NULL)
			real = (add_handle_fn) dlsym(curl, "curl_multi_add_handle");
	}
	if (real == NULL)
		abort();
	return real(multi, easy);
}
