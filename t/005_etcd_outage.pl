# etcd going away: with etcd stopped (SIGKILL, then SIGTERM) a lock call
# fails at once with a class-08 SQLSTATE and the server stays up; a lock held
# across the etcd restart is still held afterwards; the same session locks
# again once etcd is back.  With etcd frozen (SIGSTOP), a lock call fails
# after about etcd_lock.request_timeout (1 s here) instead of hanging.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use EtcdLockTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

# generous bound for "promptly": no speed is asserted beyond this
my $BOUND = 10;

my $etcd = EtcdLockTest::Etcd->new(name => 'outage');
my $node = pg_node('outage', $etcd->url);

# Run one statement in a session and wait at most $limit seconds for its
# end; returns whether it ended, stdout, stderr and seconds.
sub run_statement
{
	my ($s, $sql, $limit) = @_;
	my $t0 = time;
	$s->start($sql);
	my ($done, $out, $err) = $s->finish($limit);
	return ($done, $out // '', $err // '', time - $t0);
}

# H holds a lock across the outages; S tries to lock during them.
my $h = session($node);
my $h_pid = $h->pid;
my $s = session($node);

# S has used etcd before, so it has a lease that it reuses
is($s->query_safe(q{SELECT etcd_unlock(etcd_lock('warm-up'))}), 't', 'S locks and unlocks');

for my $sig ('KILL', 'TERM')
{
	my $what = "etcd stopped by SIG$sig";

	my $hk = $h->query_safe(qq{SELECT etcd_lock('kept-$sig', 4)});
	my $hk_lease = lease_of($hk);
	is_deeply([ $etcd->keys("etcd_lock/kept-$sig/") ], [$hk], "$what: H holds kept-$sig");

	$etcd->stop($sig);
	my $failures0 = stat_value($node, 'failures');

	# S, which has a lease already: the lock request itself fails
	my ($done, $out, $err, $elapsed) = run_statement($s, q{SELECT etcd_lock('x');}, $BOUND);
	ok($done, "$what: etcd_lock returns");
	my ($state) = $err =~ /ERROR:  ([0-9A-Z]{5}):/;
	like($state // '', qr/^08/, "$what: etcd_lock fails with a class-08 SQLSTATE")
	  or diag "stderr: $err";
	note "$what: etcd_lock failed with SQLSTATE " . ($state // 'none') . sprintf(' after %.3f s', $elapsed);
	note "  $_" for grep { /ERROR|DETAIL|WARNING|CONTEXT/ } split /\n/, $err;
	cmp_ok($elapsed, '<', $BOUND, "$what: within a bounded time");

	# a new session, which has to grant a lease first
	my ($fresh_out, $fresh_err) = ('', '');
	my $t0 = time;
	$node->psql('postgres', "\\set VERBOSITY verbose\nSELECT etcd_lock('y');",
		stdout => \$fresh_out, stderr => \$fresh_err);
	my ($fresh_state) = $fresh_err =~ /ERROR:  ([0-9A-Z]{5}):/;
	like($fresh_state // '', qr/^08/, "$what: a new session's etcd_lock fails with class 08 too")
	  or diag "stderr: $fresh_err";
	note "$what: new session failed with SQLSTATE " . ($fresh_state // 'none')
	  . sprintf(' after %.3f s', time - $t0);

	server_ok($node, $what);
	cmp_ok(stat_value($node, 'failures'), '>', $failures0,
		"$what: etcd_lock_stats.failures grew");
	is($node->safe_psql('postgres', qq{SELECT count(*) FROM etcd_locks WHERE pid <> $h_pid}),
		'0', "$what: the failed calls left no row in etcd_locks");
	is($node->safe_psql('postgres',
			qq{SELECT state FROM etcd_locks WHERE pid = $h_pid AND key = 'kept-$sig'}),
		'held', "$what: H's lock still shows held");
	is(stat_value($node, 'leases'), '1',
		"$what: only H's lease is still renewed by this server");

	# etcd comes back with the same data directory
	$etcd->start;
	is_deeply([ $etcd->keys("etcd_lock/kept-$sig/") ], [$hk],
		"$what: H's key is still in etcd after the restart");
	is(scalar($etcd->keys('etcd_lock/x/')) + scalar($etcd->keys('etcd_lock/y/')), 0,
		"$what: the failed calls left no key in etcd");

	# H's lease is renewed again: keepalives go on and it does not expire
	my $ka0 = stat_value($node, 'keepalives');
	ok( poll_until(sub { stat_value($node, 'keepalives') >= $ka0 + 2 }, $BOUND, "$what: keepalives resume"),
		"$what: the worker keeps renewing H's lease");
	like($etcd->etcdctl('lease', 'timetolive', $hk_lease), qr/remaining\([1-4]s\)/,
		"$what: H's lease is alive in etcd");
	is($node->safe_psql('postgres',
			qq{SELECT state FROM etcd_locks WHERE pid = $h_pid AND key = 'kept-$sig'}),
		'held', "$what: H's lock still held after the restart");
	is($h->query_safe(qq{SELECT etcd_unlock('$hk')}), 't', "$what: H unlocks it: true");
	is(scalar($etcd->keys("etcd_lock/kept-$sig/")), 0, "$what: its key is gone");

	# the same session S can lock and unlock again
	my $hx = $s->query_safe(q{SELECT etcd_lock('x')});
	like($hx, qr{^etcd_lock/x/[0-9a-f]+$}, "$what: the same session S locks again");
	is_deeply([ $etcd->keys('etcd_lock/x/') ], [$hx], "$what: S's lock is in etcd");
	is($s->query_safe(qq{SELECT etcd_unlock('$hx')}), 't', "$what: S unlocks it: true");
	is(scalar($etcd->keys('etcd_lock/x/')), 0, "$what: S's key is gone");
	server_ok($node, "$what, after the restart");
}

# ---------------------------------------------------------------------------
# etcd frozen (SIGSTOP): the call fails after about request_timeout
# ---------------------------------------------------------------------------
{
	my $what = 'etcd paused';

	# S has a lease for ttl 3 already, so the frozen request is the lock's
	# txn itself; a short ttl bounds how long anything etcd applies after it
	# wakes up can live.
	is($s->query_safe(q{SELECT etcd_unlock(etcd_lock('p', 3))}), 't', "$what: S warms a ttl-3 lease");
	my $leases0 = stat_value($node, 'leases');
	my $failures0 = stat_value($node, 'failures');

	# SIGSTOP takes effect asynchronously: wait until etcd is really stopped,
	# and check afterwards that nobody resumed it during the call.
	$etcd->pause;
	my $epid = $etcd->pid;
	is(proc_state($epid), 'T', "$what: etcd is stopped");
	my ($done, $out, $err, $elapsed) = run_statement($s, q{SELECT etcd_lock('p', 3);}, $BOUND);
	my $state_after = proc_state($epid);
	$etcd->resume;
	is($state_after, 'T', "$what: etcd stayed stopped during the whole call");
	ok($done, "$what: etcd_lock returns instead of hanging");
	my ($state) = $err =~ /ERROR:  ([0-9A-Z]{5}):/;
	like($state // '', qr/^08/, "$what: etcd_lock fails with a class-08 SQLSTATE")
	  or diag "stdout: $out\nstderr: $err";
	note "$what: etcd_lock failed with SQLSTATE " . ($state // 'none') . sprintf(' after %.3f s', $elapsed);
	note "  $_" for grep { /ERROR|DETAIL|WARNING|CONTEXT/ } split /\n/, $err;
	cmp_ok($elapsed, '>=', 0.9, "$what: it waited for the request timeout (1 s)");
	cmp_ok($elapsed, '<', $BOUND, "$what: within a bounded time");
	cmp_ok(stat_value($node, 'failures'), '>', $failures0,
		"$what: etcd_lock_stats.failures grew");
	server_ok($node, $what);
	is($node->safe_psql('postgres', q{SELECT count(*) FROM etcd_locks}), '0',
		"$what: no row left in etcd_locks");
	is(stat_value($node, 'leases'), $leases0 - 1,
		"$what: S's lease is no longer renewed by this server");

	# etcd may still apply the frozen txn when it wakes up, after the revoke
	# that should have undone it failed: such a key lives until its lease,
	# which nobody renews, expires (ttl 3).
	my @ghost = $etcd->keys('etcd_lock/p/');
	note "$what: key(s) etcd applied after waking up: " . (@ghost ? "@ghost" : 'none');
	my $tg = time;
	ok(poll_until(sub { scalar($etcd->keys('etcd_lock/p/')) == 0 }, $BOUND, "$what: no key left"),
		"$what: no key left in etcd (at the latest when its lease expired)");
	note sprintf('%s: the last key under p/ went %.1f s after resume', $what, time - $tg) if @ghost;

	my $hp = $s->query_safe(q{SELECT etcd_lock('p')});
	like($hp, qr{^etcd_lock/p/[0-9a-f]+$}, "$what: after resume, the same session locks");
	is($s->query_safe(qq{SELECT etcd_unlock('$hp')}), 't', "$what: and unlocks: true");
}

$s->quit;
$h->quit;
ok(poll_until(sub { scalar($etcd->keys('etcd_lock/')) == 0 }, $BOUND, 'no key left'),
	'no key left in etcd at the end');
is(stat_value($node, 'leases'), '0', 'this server renews no lease at the end');
server_ok($node, 'at the end');

$node->stop;
done_testing();
