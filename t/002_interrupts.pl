# A wait for an etcd lock ended by the usual PostgreSQL interrupts:
# pg_cancel_backend, statement_timeout and lock_timeout, and by the wait
# interval of etcd_try_lock running out.  Each must end the wait promptly with
# the right SQLSTATE, leave no waiter key and no lease behind in etcd, leave no
# 'waiting' row in etcd_locks, and leave the session usable.
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
my $PROMPT = 10;

my $etcd = EtcdLockTest::Etcd->new(name => 'interrupts');
my $node = pg_node('interrupts', $etcd->url);

# Wait until the session shows up as waiting in etcd_locks; bounded, as a
# timeout case only waits a few seconds.
sub wait_for_waiter
{
	my ($pid, $what) = @_;
	ok( poll_until(sub {
				$node->safe_psql('postgres',
					qq{SELECT count(*) FROM etcd_locks WHERE pid = $pid AND state = 'waiting'}) eq '1'
			}, $PROMPT, "$what: session B to wait"),
		"$what: session B is waiting");
	return;
}

# Session A holds the lock "busy" for the whole test.
my $sa = session($node);
my $a_pid = $sa->pid;
my $ha = $sa->query_safe(q{SELECT etcd_lock('busy')});
like($ha, qr{^etcd_lock/busy/[0-9a-f]+$}, 'session A holds "busy"');
my $a_lease = lease_of($ha);
is_deeply([ $etcd->leases ], [$a_lease], "etcd has one lease, A's");

# Session B: errors come back with their SQLSTATEs.
my $sb = session($node);
my $b_pid = $sb->pid;

# On failure, show what the extra leases are: their TTL, their keys, and
# whether this server still renews them.
sub diag_leases
{
	for my $l (@_)
	{
		diag "lease $l: " . $etcd->etcdctl('lease', 'timetolive', '--keys', $l);
		diag "  in etcd_locks: "
		  . $node->safe_psql('postgres',
			  "SELECT count(*) FROM etcd_locks WHERE to_hex(lease_id) = '$l'")
		  . ' rows; etcd_lock_stats.leases = '
		  . $node->safe_psql('postgres', 'SELECT leases FROM etcd_lock_stats');
	}
	return;
}

# What must hold after B's wait ended: nothing of B's wait left anywhere, and
# B can still lock.  b_keys / b_leases: keys and leases of B's that must
# survive (a lock B held before it waited).
sub check_clean
{
	my ($what, %opt) = @_;
	my @b_keys = @{ $opt{b_keys} // [] };
	my @b_leases = @{ $opt{b_leases} // [] };

	is_deeply([ $etcd->keys('etcd_lock/busy/') ], [$ha],
		"$what: only A's key is left under busy/");
	my @leases = $etcd->leases;
	is_deeply([ sort @leases ], [ sort($a_lease, @b_leases) ],
		"$what: no lease left for the abandoned wait")
	  or diag_leases(grep { my $l = $_; !grep { $_ eq $l } ($a_lease, @b_leases) } @leases);
	is( $node->safe_psql('postgres',
			qq{SELECT count(*) FROM etcd_locks WHERE state = 'waiting' OR key = 'busy' AND pid <> $a_pid}),
		'0', "$what: no waiting row in etcd_locks");
	is($node->safe_psql('postgres',
			qq{SELECT pid || ' ' || state FROM etcd_locks WHERE key = 'busy'}),
		"$a_pid held", "$what: A still holds busy");
	is_deeply([ map { $etcd->keys($_) } @b_keys ], \@b_keys, "$what: B's other lock is still in etcd")
	  if @b_keys;

	# the same session B can still lock (and unlock) afterwards
	is($sb->query_safe('SELECT pg_backend_pid()'), $b_pid, "$what: B is still the same session");
	my $h = $sb->query_safe(q{SELECT etcd_lock('after')});
	like($h, qr{^etcd_lock/after/[0-9a-f]+$}, "$what: B can take a lock afterwards");
	is_deeply([ $etcd->keys('etcd_lock/after/') ], [$h], "$what: B's new lock is in etcd");
	is($sb->query_safe(qq{SELECT etcd_unlock('$h')}), 't', "$what: B releases it");

	# the server did not crash
	is($node->safe_psql('postgres', 'SELECT 1'), '1', "$what: server still answers");
	unlike(slurp_file($node->logfile), qr/terminated by signal/, "$what: no backend crashed");
	return;
}

# Drop everything B holds, its leases included, before the next case.
sub reset_b
{
	$sb->query_safe('SELECT etcd_unlock_all()');
	is_deeply([ $etcd->leases ], [$a_lease], 'B has no lease left before the next case');
	return;
}

# (a) pg_cancel_backend
$sb->start(q{SELECT etcd_lock('busy');});
wait_for_waiter($b_pid, 'cancel');
is(scalar($etcd->keys('etcd_lock/busy/')), 2, 'cancel: the waiter has its own key in etcd');
my $t0 = time;
is($node->safe_psql('postgres', "SELECT pg_cancel_backend($b_pid)"), 't', 'cancel sent');
my ($done, $out, $err) = $sb->finish($PROMPT);
my $elapsed = time - $t0;
ok($done, 'cancel: the wait ended');
like($err, qr/ERROR:  57014: canceling statement due to user request/,
	'cancel: SQLSTATE 57014, canceled by user request');
cmp_ok($elapsed, '<', $PROMPT, 'cancel: the wait ended promptly');
note sprintf('cancel took %.3f s', $elapsed);
check_clean('cancel');
reset_b();

# (b) statement_timeout and (c) lock_timeout, each set to 3 s
for my $case ([ 'statement_timeout', '57014', 'statement timeout' ],
	[ 'lock_timeout', '55P03', 'lock timeout' ])
{
	my ($guc, $code, $reason) = @$case;
	$sb->query_safe(qq{SET $guc = '3s'});
	$t0 = time;
	$sb->start(q{SELECT etcd_lock('busy');});
	wait_for_waiter($b_pid, $guc);
	($done, $out, $err) = $sb->finish(3 + $PROMPT);
	$elapsed = time - $t0;
	ok($done, "$guc: the wait ended");
	like($err, qr/ERROR:  $code: canceling statement due to $reason/,
		"$guc: SQLSTATE $code, $reason");
	cmp_ok($elapsed, '>=', 3, "$guc: not before the timeout");
	cmp_ok($elapsed, '<', 3 + $PROMPT, "$guc: promptly after the timeout");
	note sprintf('%s 3s: wait ended after %.3f s', $guc, $elapsed);
	$sb->query_safe("RESET $guc");
	check_clean($guc);
	reset_b();
}

# (d) etcd_try_lock whose wait interval runs out: NULL, no error
$t0 = time;
$sb->start(q{SELECT etcd_try_lock('busy', NULL, '2 s') IS NULL AS got_null;});
wait_for_waiter($b_pid, 'try_lock');
($done, $out, $err) = $sb->finish(2 + $PROMPT);
$elapsed = time - $t0;
ok($done, 'try_lock: the wait ended');
is($out, 't', 'try_lock: NULL when the wait interval runs out');
is($err, '', 'try_lock: no error or warning');
cmp_ok($elapsed, '>=', 2, 'try_lock: waited the whole interval');
cmp_ok($elapsed, '<', 2 + $PROMPT, 'try_lock: returned promptly after the interval');
note sprintf('try_lock 2 s: returned after %.3f s', $elapsed);
check_clean('try_lock');
reset_b();

# (e) a cancelled wait must not take B's other lock with it: both ride on the
# same lease (same ttl), so the lease stays and only the waiter key goes.
my $hb = $sb->query_safe(q{SELECT etcd_lock('mine')});
my $b_lease = lease_of($hb);
$sb->start(q{SELECT etcd_lock('busy');});
wait_for_waiter($b_pid, 'cancel with another lock');
is($node->safe_psql('postgres', "SELECT pg_cancel_backend($b_pid)"), 't', 'second cancel sent');
($done, $out, $err) = $sb->finish($PROMPT);
ok($done, 'cancel with another lock: the wait ended');
like($err, qr/ERROR:  57014: canceling statement due to user request/,
	'cancel with another lock: SQLSTATE 57014');
check_clean('cancel with another lock', b_keys => [$hb], b_leases => [$b_lease]);
is($node->safe_psql('postgres', qq{SELECT state FROM etcd_locks WHERE pid = $b_pid AND key = 'mine'}),
	'held', "cancel with another lock: B's other lock is still held");
is($sb->query_safe(qq{SELECT etcd_unlock('$hb')}), 't', "B releases its other lock");
reset_b();

$sb->quit;
$sa->quit;
$etcd->wait_empty('etcd_lock/');
$etcd->no_leftovers('at the end', 'etcd_lock/');

$node->stop;
done_testing();
