/*-------------------------------------------------------------------------
 *
 * locks.h
 *		  This backend's leases and locks: taking, releasing, and letting go
 *		  of them at transaction and session end.
 *
 * IDENTIFICATION
 *		  locks.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef ETCD_LOCK_LOCKS_H
#define ETCD_LOCK_LOCKS_H

extern void etcd_locks_define_settings(void);
extern char *etcd_lock_acquire(const char *name, int ttl, bool xact, long wait_ms);
extern bool etcd_lock_release(const char *handle);
extern int	etcd_lock_release_all(void);
extern void etcd_lock_check_doomed(void);
extern int64 etcd_lock_token(const char *handle);

#endif							/* ETCD_LOCK_LOCKS_H */
