# The life of a lock across its session: renewal while the session idles,
# release when the session ends (normally, by pg_terminate_backend while
# holding and while waiting, and by a SIGKILL that makes the postmaster
# restart), and a clear error without shared_preload_libraries.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use EtcdLockTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

# Release must come from revocation, not from expiry: release tests use a
# long ttl and poll for at most $RELEASE_BOUND seconds, well below it.
my $LONG_TTL = 120;
my $RELEASE_BOUND = 20;

my $etcd = EtcdLockTest::Etcd->new(name => 'session_end');
# the test framework turns restart_after_crash off; (c) needs it on
my $node = pg_node('session_end', $etcd->url, "restart_after_crash = on\n");

sub has_lease
{
	my ($lease) = @_;
	return scalar grep { $_ eq $lease } $etcd->leases;
}

# ---------------------------------------------------------------------------
# (a) renewal: a ttl-2 lock stays held while its session idles for 10 s
# ---------------------------------------------------------------------------
my $s1 = session($node);
my $s1_pid = $s1->pid;
my $ka0 = stat_value($node, 'keepalives');
my $h1 = $s1->query_safe(q{SELECT etcd_lock('renew', 2)});
like($h1, qr{^etcd_lock/renew/[0-9a-f]+$}, 'renewal: ttl-2 lock taken');
my $l1 = lease_of($h1);
like($etcd->etcdctl('lease', 'timetolive', $l1), qr/granted with TTL\(2s\)/,
	'renewal: etcd granted a 2 s lease');

my ($checks, $missing) = $etcd->key_kept($h1, 10);
cmp_ok($checks, '>=', 10, "renewal: checked the key $checks times over 10 s");
is($missing, 0, 'renewal: the key was in etcd at every check over 10 s (5 TTLs)');
like($etcd->etcdctl('lease', 'timetolive', $l1), qr/remaining\([12]s\)/,
	'renewal: the lease is still alive after 10 s');
my $ka1 = stat_value($node, 'keepalives');
note "keepalives over the idle period: " . ($ka1 - $ka0);
# at ttl/3 that is ~15 keepalives; ask for a fraction of it
cmp_ok($ka1 - $ka0, '>=', 5, 'renewal: etcd_lock_stats.keepalives grew');
is($node->safe_psql('postgres', qq{SELECT state FROM etcd_locks WHERE pid = $s1_pid}),
	'held', 'renewal: etcd_locks still shows it held');
is($s1->query_safe(qq{SELECT etcd_unlock('$h1')}), 't', 'renewal: unlock returns true');
is(scalar($etcd->keys('etcd_lock/renew/')), 0, 'renewal: unlock deleted the key');

# ---------------------------------------------------------------------------
# (b) release on session end
# ---------------------------------------------------------------------------

# normal end (\q) while holding; $s1 still has its ttl-2 lease cached
my $h2 = $s1->query_safe(qq{SELECT etcd_lock('quit', $LONG_TTL)});
my $l2 = lease_of($h2);
ok(has_lease($l2), 'quit: the lock has its lease in etcd');
$s1->quit;
ok( poll_until(sub { scalar($etcd->keys('etcd_lock/quit/')) == 0 }, $RELEASE_BOUND, 'quit: key gone'),
	'quit: the key is gone from etcd');
ok(poll_until(sub { !has_lease($l2) && !has_lease($l1) }, $RELEASE_BOUND, 'quit: leases gone'),
	'quit: the session\'s leases are revoked, the idle one included');
ok($node->poll_query_until('postgres', qq{SELECT count(*) = 0 FROM etcd_locks WHERE pid = $s1_pid}),
	'quit: no etcd_locks row left');

# pg_terminate_backend while holding
my $s3 = session($node);
my $s3_pid = $s3->pid;
my $h3 = $s3->query_safe(qq{SELECT etcd_lock('term-held', $LONG_TTL)});
my $l3 = lease_of($h3);
is_deeply([ $etcd->keys('etcd_lock/term-held/') ], [$h3], 'terminate holder: key in etcd');
is($node->safe_psql('postgres', "SELECT pg_terminate_backend($s3_pid)"), 't',
	'terminate holder: signal sent');
ok( poll_until(sub { scalar($etcd->keys('etcd_lock/term-held/')) == 0 },
		$RELEASE_BOUND, 'terminate holder: key gone'),
	'terminate holder: the key is gone from etcd');
ok(poll_until(sub { !has_lease($l3) }, $RELEASE_BOUND, 'terminate holder: lease gone'),
	'terminate holder: the lease is revoked');
ok($node->poll_query_until('postgres', qq{SELECT count(*) = 0 FROM etcd_locks WHERE pid = $s3_pid}),
	'terminate holder: no etcd_locks row left');
$s3->quit;

# pg_terminate_backend while waiting
my $s4 = session($node);
my $s4_pid = $s4->pid;
my $h4 = $s4->query_safe(qq{SELECT etcd_lock('term-wait', $LONG_TTL)});
my $l4 = lease_of($h4);
my $s5 = session($node);
my $s5_pid = $s5->pid;
$s5->start(qq{SELECT etcd_lock('term-wait', $LONG_TTL)});
ok( $node->poll_query_until('postgres',
		qq{SELECT count(*) = 1 FROM etcd_locks WHERE pid = $s5_pid AND state = 'waiting'}),
	'terminate waiter: it waits');
my $l5 = sprintf('%x',
	$node->safe_psql('postgres', qq{SELECT lease_id FROM etcd_locks WHERE pid = $s5_pid}));
my @wkeys = $etcd->keys('etcd_lock/term-wait/');
is_deeply([ sort @wkeys ], [ sort($h4, "etcd_lock/term-wait/$l5") ],
	'terminate waiter: holder key and waiter key in etcd');
is($node->safe_psql('postgres', "SELECT pg_terminate_backend($s5_pid)"), 't',
	'terminate waiter: signal sent');
ok( poll_until(sub { my @k = $etcd->keys('etcd_lock/term-wait/'); @k == 1 && $k[0] eq $h4 },
		$RELEASE_BOUND, 'terminate waiter: waiter key gone'),
	'terminate waiter: the waiter key is gone, the holder key stays');
ok(poll_until(sub { !has_lease($l5) }, $RELEASE_BOUND, 'terminate waiter: lease gone'),
	'terminate waiter: the waiter\'s lease is revoked');
ok(has_lease($l4), 'terminate waiter: the holder\'s lease stays');
ok($node->poll_query_until('postgres', qq{SELECT count(*) = 0 FROM etcd_locks WHERE pid = $s5_pid}),
	'terminate waiter: no etcd_locks row left')
  or diag "left in etcd_locks for the terminated waiter:\n"
  . $node->safe_psql('postgres', qq{SELECT * FROM etcd_locks WHERE pid = $s5_pid})
  . "\netcd_lock_stats: "
  . $node->safe_psql('postgres', q{SELECT * FROM etcd_lock_stats});
is($node->safe_psql('postgres', qq{SELECT state FROM etcd_locks WHERE pid = $s4_pid}),
	'held', 'terminate waiter: the holder still holds');
$s5->quit;
is($s4->query_safe(qq{SELECT etcd_unlock('$h4')}), 't', 'terminate waiter: holder unlocks');
$s4->quit;

my $log = slurp_file($node->logfile);
like($log, qr/terminating connection due to administrator command/,
	'the terminations are in the log');
unlike($log, qr/terminated by signal/, 'no backend crashed so far');
is($node->safe_psql('postgres', 'SELECT 1'), '1', 'the server still answers');

# ---------------------------------------------------------------------------
# (c) SIGKILL of a holder: the postmaster restarts, etcd expires the lease
# ---------------------------------------------------------------------------
my $s6 = session($node);
my $s6_pid = $s6->pid;
my $h6 = $s6->query_safe(q{SELECT etcd_lock('killed', 2)});
my $l6 = lease_of($h6);
is_deeply([ $etcd->keys('etcd_lock/killed/') ], [$h6], 'SIGKILL: the lock is in etcd');
my $log_offset = -s $node->logfile;
my $t0 = time;
ok(kill('KILL', $s6_pid), "SIGKILL sent to backend $s6_pid");
$s6->quit;
ok( poll_until(sub { scalar($etcd->keys('etcd_lock/killed/')) == 0 }, undef, 'SIGKILL: key gone'),
	'SIGKILL: etcd freed the lock');
my $freed_after = time - $t0;
note sprintf('SIGKILL: key gone %.2f s after the kill (ttl 2 s)', $freed_after);
cmp_ok($freed_after, '<', $RELEASE_BOUND, 'SIGKILL: freed within a bounded time');
ok(!has_lease($l6), 'SIGKILL: the lease expired in etcd');
ok( $node->wait_for_log(qr/all server processes terminated; reinitializing/, $log_offset),
	'SIGKILL: the postmaster restarted');
ok($node->poll_query_until('postgres', 'SELECT 1', '1'), 'SIGKILL: the server accepts connections again');
like(slurp_file($node->logfile, $log_offset),
	qr/server process \(PID $s6_pid\) was terminated by signal 9/,
	'SIGKILL: the log names the killed backend');
my $h7 = $node->safe_psql('postgres', q{SELECT etcd_try_lock('killed')});
like($h7, qr{^etcd_lock/killed/[0-9a-f]+$}, 'SIGKILL: another session acquires the lock');
ok( poll_until(sub { scalar($etcd->keys('etcd_lock/')) == 0 }, $RELEASE_BOUND, 'no key left'),
	'SIGKILL: that session ended and released it');
ok(poll_until(sub { scalar($etcd->leases) == 0 }, $RELEASE_BOUND, 'no lease left'),
	'no lease left in etcd');
$node->stop;

# ---------------------------------------------------------------------------
# (d) without shared_preload_libraries: a clear error, nothing in etcd
# ---------------------------------------------------------------------------
my $plain = PostgreSQL::Test::Cluster->new('no_preload');
$plain->init;
$plain->append_conf('postgresql.conf', "etcd_lock.endpoints = '" . $etcd->url . "'\n");
$plain->start;
my @no_preload_queries =
  (q{SELECT etcd_lock('x')}, q{SELECT etcd_try_lock('x')}, q{SELECT * FROM etcd_locks});
my ($created_rc, $created_err) = (0, '');
$created_rc = $plain->psql('postgres', 'CREATE EXTENSION etcd_lock', stderr => \$created_err);
is($created_rc, 0, 'no preload: CREATE EXTENSION etcd_lock works')
  or diag "CREATE EXTENSION etcd_lock without preload: $created_err";
SKIP:
{
	skip 'the extension could not be created (see the failure above)', 3 * @no_preload_queries
	  if $created_rc != 0;
	for my $q (@no_preload_queries)
	{
		my ($stdout, $stderr) = ('', '');
		my $rc = $plain->psql('postgres', "\\set VERBOSITY verbose\n$q;",
			stdout => \$stdout, stderr => \$stderr);
		isnt($rc, 0, "no preload: $q fails");
		like($stderr,
			qr/ERROR:  55000: etcd_lock must be loaded via shared_preload_libraries/,
			"no preload: $q gives SQLSTATE 55000");
		like($stderr, qr/HINT:  .*shared_preload_libraries/,
			"no preload: $q hints at shared_preload_libraries");
	}
}
is($plain->safe_psql('postgres', 'SELECT 1'), '1', 'no preload: the server still answers');
is(scalar($etcd->keys('x')), 0, 'no preload: nothing written to etcd');
is(scalar($etcd->leases), 0, 'no preload: no lease granted');
unlike(slurp_file($plain->logfile), qr/terminated by signal/, 'no preload: no crash');
$plain->stop;

done_testing();
