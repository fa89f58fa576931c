/*-------------------------------------------------------------------------
 *
 * worker.h
 *		  The lease worker, a background worker that renews the leases
 *		  registered in the shared tables and revokes those given up.
 *
 * IDENTIFICATION
 *		  worker.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef ETCD_LOCK_WORKER_H
#define ETCD_LOCK_WORKER_H

extern void etcd_worker_register(void);
extern PGDLLEXPORT void etcd_lock_worker_main(Datum arg);

#endif							/* ETCD_LOCK_WORKER_H */
