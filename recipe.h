/*-------------------------------------------------------------------------
 *
 * recipe.h
 *		  The etcd requests of the lock recipe: leases, and keys queued
 *		  under a lock name in etcd's own layout (NAME/<lease ID in hex>).
 *
 * IDENTIFICATION
 *		  recipe.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef ETCD_LOCK_RECIPE_H
#define ETCD_LOCK_RECIPE_H

typedef enum EtcdRecipeStatus
{
	ETCD_RECIPE_OWNED,			/* our key is the oldest: the lock is ours */
	ETCD_RECIPE_WAIT,			/* an older key is queued before ours */
	ETCD_RECIPE_LOST,			/* our key is gone */
	ETCD_RECIPE_NOLEASE			/* etcd has no such lease */
} EtcdRecipeStatus;

typedef enum EtcdReleaseStatus
{
	ETCD_RELEASE_DELETED,		/* our key, deleted */
	ETCD_RELEASE_GONE,			/* the key was no longer ours */
	ETCD_RELEASE_FAILED			/* etcd did not answer */
} EtcdReleaseStatus;

extern int64 etcd_lease_grant(int ttl, int *granted_ttl);
extern bool etcd_lease_revoke(int64 lease_id, int elevel);
extern EtcdRecipeStatus etcd_recipe_enqueue(const char *name, const char *mykey,
											int64 lease_id, int64 *myrev,
											char **pred, int64 *watch_from);
extern EtcdRecipeStatus etcd_recipe_check(const char *name, const char *mykey,
										  int64 myrev, char **pred,
										  int64 *watch_from);
extern EtcdReleaseStatus etcd_recipe_release(const char *mykey, int64 myrev,
											 int elevel);
extern bool etcd_key_delete(const char *mykey, int elevel);
extern int	etcd_recipe_verify(const char **keys, const int64 *revs, int n);

#endif							/* ETCD_LOCK_RECIPE_H */
