# etcd_lock/Makefile

MODULE_big = etcd_lock
OBJS = \
	$(WIN32RES) \
	client.o \
	etcd_lock.o \
	grpc.o \
	http.o \
	locks.o \
	recipe.o \
	shmem.o \
	worker.o

EXTENSION = etcd_lock
DATA = etcd_lock--1.0.sql
PGFILEDESC = "etcd_lock - distributed locks held in etcd"

SHLIB_LINK = -lcurl -lcjson

# scripts/test.sh (run_suite in scripts/lib.sh) starts etcd and writes
# regress.conf, which points the temporary instance at it and preloads the
# module.
REGRESS = etcd_lock xact
REGRESS_OPTS = --temp-instance=./tmp_regress --temp-config=./regress.conf
TAP_TESTS = 1
EXTRA_CLEAN = tmp_regress regress.conf

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# PGXS tracks no header dependencies: rebuild everything when a header changes
$(OBJS): $(wildcard *.h)
