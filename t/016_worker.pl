# The lease worker as an administrator sees it: its row in pg_stat_activity,
# pg_terminate_backend restarting it without losing a lock, and the wait
# events of the worker and of a session waiting for an etcd lock (named on
# PostgreSQL 17 and later, plain "Extension" before).
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use EtcdLockTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $etcd = EtcdLockTest::Etcd->new(name => 'worker');
my $node = pg_node('worker', $etcd->url);
my $pg17 = $node->safe_psql('postgres', 'SHOW server_version_num') >= 170000;

sub sql { return $node->safe_psql('postgres', $_[0]); }

# --- the worker's row ------------------------------------------------------

my $row = q{SELECT pid, coalesce(datname, '-'), coalesce(usename, '-')
  FROM pg_stat_activity WHERE backend_type = 'etcd_lock lease worker'};
ok($node->poll_query_until('postgres', "SELECT count(*) FROM ($row) w", '1'),
	'the worker has one row in pg_stat_activity');
my ($wpid, $db, $user) = split /\|/, sql($row);
is($db, '-', 'it is connected to no database');
is($wpid, sql('SELECT worker_pid FROM etcd_lock_stats'),
	'its pid is etcd_lock_stats.worker_pid');
my $wait = sql(qq{SELECT wait_event_type || '/' || wait_event FROM pg_stat_activity WHERE pid = $wpid});
is($wait, $pg17 ? 'Extension/EtcdLeaseWorker' : 'Extension/Extension',
	'the idle worker shows its wait event');

# --- a lock held across a terminated worker -------------------------------

my $s = session($node);
my $h = $s->query_safe(q{SELECT etcd_lock('kept', 5)});
like($h, qr{^etcd_lock/kept/[0-9a-f]+$}, 'a ttl-5 lock is held');
my $rev = $s->query_safe(qq{SELECT etcd_lock_token('$h')});
my $lost0 = stat_value($node, 'lost');

is(sql("SELECT pg_terminate_backend($wpid)"), 't', 'pg_terminate_backend accepts the worker');
ok( $node->poll_query_until('postgres', qq{SELECT count(*) FROM pg_stat_activity
		   WHERE backend_type = 'etcd_lock lease worker' AND pid <> $wpid}, '1'),
	'a new worker comes back');
my $new_pid = sql(q{SELECT pid FROM pg_stat_activity WHERE backend_type = 'etcd_lock lease worker'});
isnt($new_pid, $wpid, 'with a new pid');
like(slurp_file($node->logfile), qr/terminating background worker "etcd_lock lease worker" due to administrator command/,
	'the log says why it ended');

# two ttls later the lock must still be ours: the new worker renewed it
my $ka0 = stat_value($node, 'keepalives');
ok($node->poll_query_until('postgres', "SELECT keepalives >= $ka0 + 6 FROM etcd_lock_stats", 't'),
	'the new worker renews (6 keepalives: two ttls of a ttl-5 lease)');
is($s->query_safe(q{SELECT state FROM etcd_locks WHERE key = 'kept'}), 'held',
	'the lock is still held');
is($s->query_safe(qq{SELECT etcd_lock_token('$h')}), $rev, 'with the same fencing token');
is_deeply([ $etcd->keys($h) ], [$h], 'its key is still in etcd');
is(stat_value($node, 'lost'), $lost0, 'no lock was lost');

# --- the wait event of a session waiting for a lock ----------------------

my $w = session($node);
my $w_pid = $w->pid;
$w->start(q{SELECT etcd_lock('kept', 5)});
ok( $node->poll_query_until('postgres',
		qq{SELECT count(*) = 1 FROM etcd_locks WHERE pid = $w_pid AND state = 'waiting'}),
	'a second session waits for the lock');
my $want = $pg17 ? 'Extension/EtcdLockWait' : 'Extension/Extension';
ok( $node->poll_query_until('postgres',
		qq{SELECT wait_event_type || '/' || wait_event FROM pg_stat_activity WHERE pid = $w_pid}, $want),
	"the waiting session shows $want");
is($s->query_safe(qq{SELECT etcd_unlock('$h')}), 't', 'the holder lets go');
my ($done, $out, $err) = $w->finish(30);
ok($done, 'the waiter then gets the lock');
like($out, qr{^etcd_lock/kept/[0-9a-f]+$}m, 'and its handle');
is($err, '', 'without an error');

# --- nothing left behind ---------------------------------------------------

$s->quit;
$w->quit;
ok($node->poll_query_until('postgres', 'SELECT leases + locks + revoking FROM etcd_lock_stats', '0'),
	'no lease, lock or revoke left on the server');
$etcd->no_leftovers('end');
unlike(slurp_file($node->logfile), qr/PANIC|terminated by signal/, 'no backend crashed');

$node->stop;
done_testing();
