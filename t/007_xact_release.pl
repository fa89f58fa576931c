# Transaction locks: how they end.
#  (a) a lock lost before COMMIT, by `etcdctl lease revoke` and by
#      `etcdctl del` of its key (lease alive, so only the commit check can
#      see it): COMMIT fails with 40L01, the writes roll back, and the
#      session can lock again; with etcd_lock.commit_check = off the same
#      loss goes unnoticed;
#  (b) release paths: ROLLBACK TO SAVEPOINT, ABORT, an error, COMMIT and the
#      end of an implicit transaction each let a waiter in; a lock taken in a
#      released savepoint stays with the parent;
#  (c) release after commit: a waiter that reads the guarded row in the
#      statement after its lock returns sees the holder's committed write,
#      over 20 handoffs; and while a COMMIT is flushed but not yet visible
#      (waiting for an absent synchronous standby) the lock is still held;
#  (d) a doomed transaction: the worker finds the lease gone, etcd_locks
#      shows 'lost', the next statement fails with 40L01 and nothing commits
#      (also when COMMIT is the next statement);
#  (e) PREPARE TRANSACTION under a transaction lock fails with 0A000.
# Each failure asserts the exact SQLSTATE, that no key is left for the lock
# in etcd and no lease is renewed for it, and that no backend crashed.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use EtcdLockTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $etcd = EtcdLockTest::Etcd->new(name => 'xact_release');
# synchronous_standby_names names a standby that never comes, so a session
# that sets synchronous_commit = on waits at COMMIT with its commit record
# flushed but not yet visible; everyone else commits locally
my $node = pg_node('xact_release', $etcd->url, qq{
max_prepared_transactions = 2
wal_level = replica
max_wal_senders = 1
synchronous_standby_names = 'nobody'
synchronous_commit = local
});

$node->safe_psql('postgres', q{
CREATE TABLE t (id int PRIMARY KEY, note text);
CREATE TABLE kv (id int PRIMARY KEY, n int NOT NULL);
INSERT INTO kv VALUES (1, 0);
});

sub keys_of { my ($name) = @_; return [ $etcd->keys("etcd_lock/$name/") ]; }

sub row_count
{
	my ($id) = @_;
	return $node->safe_psql('postgres', "SELECT count(*) FROM t WHERE id = $id");
}

my $s1 = session($node);
my $s2 = session($node);
my ($s1_pid, $s2_pid) = ($s1->pid, $s2->pid);

# --- (a) lease revoked before COMMIT ---------------------------------------

# a ttl used nowhere else gets a fresh lease, so the worker's first
# keepalive (at ttl/3 = 20 s) comes long after the COMMIT: only the commit
# check can find the loss
$s1->query_safe('BEGIN');
my $h = $s1->query_safe(q{SELECT etcd_xact_lock('revoked', 61)});
like($h, qr{^etcd_lock/revoked/[0-9a-f]+$}, '(a) the transaction holds "revoked"');
my $lease = lease_of($h);
is(sprintf('%x', $node->safe_psql('postgres',
			q{SELECT lease_id FROM etcd_locks WHERE key = 'revoked'})),
	$lease, '(a) etcd_locks.lease_id is the lease in the handle');
$s1->query_safe(q{INSERT INTO t VALUES (1, 'written under a revoked lease')});
$etcd->etcdctl('lease', 'revoke', $lease);
is_deeply(keys_of('revoked'), [], '(a) revoking the lease deleted the key');

my ($out, $err, $state) = $s1->query('COMMIT');
is($state, '40L01', '(a) COMMIT fails with SQLSTATE 40L01');
like($err, qr/ERROR:  40L01: etcd transaction lock "revoked" was lost before commit/,
	'(a) the error names the lock');
is(row_count(1), '0', '(a) the row written under the lost lock is not there');
is($s1->query_safe(q{SELECT count(*) FROM etcd_locks WHERE pid = pg_backend_pid()}), '0',
	'(a) the session lists no lock');
is_deeply(keys_of('revoked'), [], '(a) no key left under the name');
ok(!grep({ $_ eq $lease } $etcd->leases), '(a) the revoked lease is gone from etcd');
server_ok($node, '(a)');

# the same session locks again, on a new lease, and commits
$s1->query_safe('BEGIN');
my $h2 = $s1->query_safe(q{SELECT etcd_xact_lock('revoked', 61)});
like($h2, qr{^etcd_lock/revoked/[0-9a-f]+$}, '(a) the session locks again');
isnt(lease_of($h2), $lease, '(a) on a new lease');
$s1->query_safe(q{INSERT INTO t VALUES (1, 'written after relocking')});
$s1->query_safe('COMMIT');
is(row_count(1), '1', '(a) the retried transaction committed');
is_deeply(keys_of('revoked'), [], '(a) COMMIT released the new key');
is_deeply([ $etcd->leases ], [ lease_of($h2) ],
	'(a) etcd has only the new lease, which the session keeps for reuse');
is($node->safe_psql('postgres', 'SELECT leases FROM etcd_lock_stats'), '1',
	'(a) the server renews only that lease');

# --- (a') key deleted before COMMIT, lease alive ---------------------------

# the lease is fine, so the worker never notices: only the commit check can
$s1->query_safe('BEGIN');
$h = $s1->query_safe(q{SELECT etcd_xact_lock('deleted', 61)});
is(lease_of($h), lease_of($h2), "(a') the session reuses its lease");
$s1->query_safe(q{INSERT INTO t VALUES (2, 'written after the key was deleted')});
$etcd->etcdctl('del', $h);
($out, $err, $state) = $s1->query('COMMIT');
is($state, '40L01', "(a') COMMIT fails with SQLSTATE 40L01");
like($err, qr/ERROR:  40L01: etcd transaction lock "deleted" was lost before commit/,
	"(a') the error names the lock");
is(row_count(2), '0', "(a') the row is not there");
is_deeply(keys_of('deleted'), [], "(a') no key left under the name");
is($s1->query_safe(q{SELECT count(*) FROM etcd_locks WHERE pid = pg_backend_pid()}), '0',
	"(a') the session lists no lock");
server_ok($node, "(a')");

# with commit_check off, the same loss goes unnoticed (documented trade-off)
$s1->query_safe('SET etcd_lock.commit_check = off');
$s1->query_safe('BEGIN');
$h = $s1->query_safe(q{SELECT etcd_xact_lock('deleted', 61)});
$s1->query_safe(q{INSERT INTO t VALUES (2, 'committed without the check')});
$etcd->etcdctl('del', $h);
($out, $err, $state) = $s1->query('COMMIT');
is($state, '00000', "(a') with etcd_lock.commit_check = off, COMMIT succeeds");
is(row_count(2), '1', "(a') and the row is there");
is_deeply(keys_of('deleted'), [], "(a') no key left under the name");
$s1->query_safe('RESET etcd_lock.commit_check');

# --- (b) release paths -----------------------------------------------------

# s2 queues for "paths" inside a transaction; returns once it is waiting
sub start_waiter
{
	my ($name) = @_;
	$s2->query_safe('BEGIN');
	$s2->start(qq{SELECT etcd_xact_lock('$name')});
	ok($node->poll_query_until('postgres', qq{
SELECT count(*) = 1 FROM etcd_locks
WHERE key = '$name' AND pid = $s2_pid AND state = 'waiting'}),
		"the waiter queues for $name");
	return;
}

# the waiter acquires: etcd_locks shows it holding, its statement returns
sub waiter_acquired
{
	my ($name, $what) = @_;
	ok($node->poll_query_until('postgres', qq{
SELECT count(*) = 1 FROM etcd_locks
WHERE key = '$name' AND pid = $s2_pid AND state = 'held'}),
		"$what: the waiter holds $name");
	my (undef, $wh) = $s2->finish;
	is_deeply(keys_of($name), [$wh], "$what: the waiter's key is the only one");
	return;
}

sub waiter_commits
{
	my ($name, $what) = @_;
	$s2->query_safe('COMMIT');
	is_deeply(keys_of($name), [], "$what: no key left after the waiter's COMMIT");
	return;
}

# ROLLBACK TO SAVEPOINT releases a lock taken inside the savepoint
$s1->query_safe('BEGIN');
$s1->query_safe('SAVEPOINT sp');
$s1->query_safe(q{SELECT etcd_xact_lock('paths')});
start_waiter('paths');
$s1->query_safe('ROLLBACK TO SAVEPOINT sp');
waiter_acquired('paths', '(b) ROLLBACK TO SAVEPOINT');
is($s1->query_safe(q{SELECT count(*) FROM etcd_locks WHERE pid = pg_backend_pid()}), '0',
	'(b) the holder, still in its transaction, holds nothing');
$s1->query_safe('COMMIT');
waiter_commits('paths', '(b) ROLLBACK TO SAVEPOINT');

# a lock taken in a released savepoint belongs to the parent: the waiter
# waits until the transaction ends
$s1->query_safe('BEGIN');
$s1->query_safe('SAVEPOINT sp');
$s1->query_safe(q{SELECT etcd_xact_lock('paths')});
$s1->query_safe('RELEASE SAVEPOINT sp');
start_waiter('paths');
$s1->query_safe('SAVEPOINT sp2');
$s1->query_safe('ROLLBACK TO SAVEPOINT sp2');
is($node->safe_psql('postgres', qq{
SELECT state FROM etcd_locks WHERE key = 'paths' ORDER BY pid = $s2_pid}),
	"held\nwaiting", '(b) RELEASE SAVEPOINT: the parent keeps the lock');
$s1->query_safe('ROLLBACK');
waiter_acquired('paths', '(b) ABORT after RELEASE SAVEPOINT');
waiter_commits('paths', '(b) ABORT after RELEASE SAVEPOINT');

# ABORT
$s1->query_safe('BEGIN');
$s1->query_safe(q{SELECT etcd_xact_lock('paths')});
start_waiter('paths');
$s1->query_safe('ROLLBACK');
waiter_acquired('paths', '(b) ABORT');
waiter_commits('paths', '(b) ABORT');

# an error aborts the transaction at once: as with PostgreSQL's advisory
# transaction locks, the lock goes then, before the client's ROLLBACK
$s1->query_safe('BEGIN');
$s1->query_safe(q{SELECT etcd_xact_lock('paths')});
start_waiter('paths');
($out, $err, $state) = $s1->query('SELECT 1/0');
is($state, '22012', '(b) an error aborts the transaction');
waiter_acquired('paths', '(b) error in the transaction');
is($node->safe_psql('postgres', qq{SELECT count(*) FROM etcd_locks WHERE pid = $s1_pid}),
	'0', '(b) the failed transaction holds nothing before its ROLLBACK');
$s1->query_safe('ROLLBACK');
waiter_commits('paths', '(b) error in the transaction');

# COMMIT
$s1->query_safe('BEGIN');
$s1->query_safe(q{SELECT etcd_xact_lock('paths')});
start_waiter('paths');
$s1->query_safe('COMMIT');
waiter_acquired('paths', '(b) COMMIT');
waiter_commits('paths', '(b) COMMIT');

# the statement's implicit transaction: the lock ends with the statement.
# s1's statement takes the lock, then blocks on an advisory lock that a
# third session holds, so s2 can queue behind it.
my $s3 = session($node);
$s3->query_safe('SELECT pg_advisory_lock(7)');
$s1->start(q{SELECT etcd_xact_lock('paths') IS NOT NULL AS implicit_lock, pg_advisory_xact_lock(7)});
ok($node->poll_query_until('postgres', qq{
SELECT count(*) = 1 FROM etcd_locks WHERE key = 'paths' AND pid = $s1_pid AND state = 'held'
   AND EXISTS (SELECT FROM pg_locks WHERE pid = $s1_pid AND locktype = 'advisory' AND NOT granted)}),
	'(b) a statement outside a transaction block holds the lock while it runs');
start_waiter('paths');
$s3->query_safe('SELECT pg_advisory_unlock(7)');
waiter_acquired('paths', '(b) end of an implicit transaction');
my (undef, undef, $implicit_err) = $s1->finish;
is($implicit_err, '', '(b) the implicit transaction had no error');
waiter_commits('paths', '(b) end of an implicit transaction');
$s3->quit;

# --- (c) release after commit ----------------------------------------------

# The waiter reads kv in the statement right after its lock returns; in
# READ COMMITTED that statement's snapshot is taken after the wait, so it
# must see the holder's committed write if the release came after the
# commit was visible.
my $handoffs = 20;
my $reader = q{BEGIN;
SELECT etcd_xact_lock('handoff') IS NOT NULL AS got \gset
SELECT n FROM kv WHERE id = 1;
COMMIT;};
my @seen;
my $reader_errors = '';
for my $i (1 .. $handoffs)
{
	$s1->query_safe('BEGIN');
	$s1->query_safe(q{SELECT etcd_xact_lock('handoff')});
	$s1->query_safe("UPDATE kv SET n = $i WHERE id = 1");
	$s2->start($reader);
	$node->poll_query_until('postgres', qq{
SELECT count(*) = 1 FROM etcd_locks
WHERE key = 'handoff' AND pid = $s2_pid AND state = 'waiting'})
	  or die "handoff $i: the waiter did not queue";
	$s1->query_safe('COMMIT');
	my (undef, $n, $err) = $s2->finish;
	push @seen, $n // 'none';
	$reader_errors .= $err // '';
}
is_deeply(\@seen, [ 1 .. $handoffs ],
	"(c) after each of $handoffs handoffs the waiter saw the holder's committed write");
is($reader_errors, '', '(c) the waiter had no error');
is_deeply(keys_of('handoff'), [], '(c) no key left');

# The lock outlives a COMMIT that is flushed but not yet visible: s1's
# COMMIT waits for the absent synchronous standby after the commit check,
# and the lock must still be held there.  Canceling the wait makes the
# commit visible; only then does the waiter get the lock, and it sees the
# write.
$s1->query_safe('SET synchronous_commit = on');
$s1->query_safe('BEGIN');
$h = $s1->query_safe(q{SELECT etcd_xact_lock('handoff')});
$s1->query_safe('UPDATE kv SET n = 1000 WHERE id = 1');
$s2->start($reader);
ok($node->poll_query_until('postgres', qq{
SELECT count(*) = 1 FROM etcd_locks
WHERE key = 'handoff' AND pid = $s2_pid AND state = 'waiting'}),
	'(c) the waiter queues');
$s1->start('COMMIT');
ok( $node->poll_query_until('postgres',
		qq{SELECT wait_event = 'SyncRep' FROM pg_stat_activity WHERE pid = $s1_pid}),
	'(c) the holder\'s COMMIT waits for the synchronous standby');
my @during = @{ keys_of('handoff') };
ok(scalar(grep { $_ eq $h } @during),
	'(c) while the commit is not visible, the holder\'s key is still in etcd');
is(scalar(@during), 2, '(c) beside the waiter\'s key');
is($node->safe_psql('postgres', qq{
SELECT string_agg(state, ',' ORDER BY pid = $s2_pid) FROM etcd_locks WHERE key = 'handoff'}),
	'held,waiting', '(c) and the waiter still waits');
is($node->safe_psql('postgres', 'SELECT n FROM kv WHERE id = 1'), $handoffs,
	'(c) the write is not visible yet');
$node->safe_psql('postgres', "SELECT pg_cancel_backend($s1_pid)");
my (undef, undef, $commit_err) = $s1->finish;
like($commit_err, qr/canceling wait for synchronous replication/,
	'(c) canceling the wait completes the local commit');
my (undef, $seen, $seen_err) = $s2->finish;
is($seen, '1000', '(c) the waiter, let in after the commit became visible, sees the write');
is($seen_err, '', '(c) the waiter had no error');
$s1->query_safe('RESET synchronous_commit');
is_deeply(keys_of('handoff'), [], '(c) no key left');

# --- (d) a doomed transaction ------------------------------------------------

# ttl 2: the worker renews every ~0.7 s and learns of the revoke then
sub doom
{
	my ($name, $id) = @_;
	$s1->query_safe('BEGIN');
	my $h = $s1->query_safe(qq{SELECT etcd_xact_lock('$name', 2)});
	$s1->query_safe(qq{INSERT INTO t VALUES ($id, 'doomed')});
	my $lease = lease_of($h);
	$etcd->etcdctl('lease', 'revoke', $lease);
	ok($node->poll_query_until('postgres', qq{
SELECT state = 'lost' FROM etcd_locks WHERE key = '$name' AND pid = $s1_pid}),
		"(d) etcd_locks shows $name lost once the worker found the lease gone");
	return $lease;
}

my $leases_before = $node->safe_psql('postgres', 'SELECT leases FROM etcd_lock_stats');
$lease = doom('doomed', 3);
($out, $err, $state) = $s1->query('SELECT count(*) FROM t');
is($state, '40L01', '(d) the next statement fails with SQLSTATE 40L01');
like($err, qr/ERROR:  40L01: etcd transaction lock "doomed" was lost/,
	'(d) the error names the lock');
($out, $err, $state) = $s1->query(qq{INSERT INTO t VALUES (4, 'after the loss')});
is($state, '25P02', '(d) the transaction stays aborted');
$s1->query_safe('COMMIT');    # ends the aborted transaction as a ROLLBACK
is(row_count(3) + row_count(4), 0, '(d) nothing of the doomed transaction committed');
is_deeply(keys_of('doomed'), [], '(d) no key left under the name');
ok(!grep({ $_ eq $lease } $etcd->leases), '(d) the revoked lease is gone from etcd');
is($s1->query_safe(q{SELECT count(*) FROM etcd_locks WHERE pid = pg_backend_pid()}), '0',
	'(d) the session lists no lock');
server_ok($node, '(d)');

# COMMIT as the next statement
$lease = doom('doomed', 5);
($out, $err, $state) = $s1->query('COMMIT');
is($state, '40L01', '(d) COMMIT right after the loss fails with SQLSTATE 40L01');
like($err, qr/ERROR:  40L01: etcd transaction lock "doomed" was lost/,
	'(d) the error names the lock');
is(row_count(5), '0', '(d) the row is not there');
is_deeply(keys_of('doomed'), [], '(d) no key left under the name');
is($node->safe_psql('postgres', qq{SELECT count(*) FROM etcd_locks WHERE pid = $s1_pid}),
	'0', '(d) the session lists no lock');

# the lost lease is no longer renewed: the server is back to the leases
# it had before the ttl-2 lease was granted
is($node->safe_psql('postgres', 'SELECT leases FROM etcd_lock_stats'), $leases_before,
	'(d) the server no longer renews the lost lease');
$s1->query_safe('BEGIN');
$h = $s1->query_safe(q{SELECT etcd_xact_lock('doomed', 2)});
isnt(lease_of($h), $lease, '(d) the session locks again, on a new lease');
$s1->query_safe(q{INSERT INTO t VALUES (5, 'after the doomed one')});
$s1->query_safe('COMMIT');
is(row_count(5), '1', '(d) and commits');
server_ok($node, '(d)');

# --- (e) PREPARE TRANSACTION -------------------------------------------------

$s1->query_safe('BEGIN');
$s1->query_safe(q{SELECT etcd_xact_lock('prepared')});
$s1->query_safe(q{INSERT INTO t VALUES (6, 'prepared')});
($out, $err, $state) = $s1->query(q{PREPARE TRANSACTION 'etcd_lock_007'});
is($state, '0A000', '(e) PREPARE TRANSACTION under a transaction lock fails with 0A000');
like($err, qr/ERROR:  0A000: cannot PREPARE a transaction that holds etcd transaction locks/,
	'(e) with a clear message');
is($node->safe_psql('postgres', 'SELECT count(*) FROM pg_prepared_xacts'), '0',
	'(e) no prepared transaction was left');
is(row_count(6), '0', '(e) the row is not there');
is_deeply(keys_of('prepared'), [], '(e) no key left under the name');
is($s1->query_safe(q{SELECT count(*) FROM etcd_locks WHERE pid = pg_backend_pid()}), '0',
	'(e) the session lists no lock');
server_ok($node, '(e)');

# the refusal is the lock's: without one (here, released with its
# savepoint), PREPARE works
$s1->query_safe('BEGIN');
$s1->query_safe('SAVEPOINT sp');
$s1->query_safe(q{SELECT etcd_xact_lock('prepared')});
$s1->query_safe('ROLLBACK TO SAVEPOINT sp');
$s1->query_safe(q{INSERT INTO t VALUES (7, 'prepared')});
($out, $err, $state) = $s1->query(q{PREPARE TRANSACTION 'etcd_lock_007'});
is($state, '00000', '(e) PREPARE works once no transaction lock is held');
$s1->query_safe(q{COMMIT PREPARED 'etcd_lock_007'});
is(row_count(7), '1', '(e) and the prepared transaction commits');

# --- nothing left ------------------------------------------------------------

$s1->quit;
$s2->quit;
ok($node->poll_query_until('postgres', 'SELECT locks = 0 AND leases = 0 FROM etcd_lock_stats'),
	'no lock or lease left on the server');
$etcd->wait_empty('etcd_lock/');
$etcd->no_leftovers('end', 'etcd_lock/');
server_ok($node, 'end');

$node->stop;
done_testing();
