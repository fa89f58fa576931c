# Interoperability with etcd's own lock recipe: with etcd_lock.prefix = '' a
# PostgreSQL holder and an `etcdctl lock NAME` holder exclude each other, in
# both directions, and the PostgreSQL key layout is etcd's: NAME/<lease id in
# lower-case hex, unpadded>.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use EtcdLockTest;
use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

# generous bound for anything that should happen promptly
my $BOUND = 20;

my $etcd = EtcdLockTest::Etcd->new(name => 'interop');
my $node = pg_node('interop', $etcd->url);

# `etcdctl lock NAME [cmd...]` in the background; its output is collected.
sub etcdctl_lock
{
	my (@args) = @_;
	my $p = { out => '', err => '' };
	$p->{h} = IPC::Run::start([ 'etcdctl', '--endpoints', $etcd->url, 'lock', @args ],
		'<', \undef, '>', \$p->{out}, '2>', \$p->{err});
	return $p;
}

sub running
{
	my ($p) = @_;
	$p->{h}->pump_nb if $p->{h}->pumpable;
	return $p->{h}->pumpable;
}

# Wait until the process's stdout matches, for at most $BOUND seconds;
# false at once if it exits without that.
sub wait_output
{
	my ($p, $re) = @_;
	return poll_until(sub { !running($p) || $p->{out} =~ $re }, $BOUND, "etcdctl to print $re", 0.02)
	  && $p->{out} =~ $re;
}

# Wait until the process has exited; returns whether it did.
sub wait_exit
{
	my ($p) = @_;
	return poll_until(sub { !running($p) }, $BOUND, 'etcdctl to exit', 0.02);
}

my $s = session($node);
$s->query_safe(q{SET etcd_lock.prefix = ''});
my $pid = $s->pid;

# ---------------------------------------------------------------------------
# (a) etcdctl holds; PostgreSQL cannot take the lock until etcdctl lets go
# ---------------------------------------------------------------------------
my $ctl = etcdctl_lock('interop-a');
ok(wait_output($ctl, qr{^interop-a/[0-9a-f]+\n}m), 'etcdctl holds interop-a')
  or diag "etcdctl stdout: $ctl->{out}\nstderr: $ctl->{err}";
my ($ctl_key) = $ctl->{out} =~ m{^(interop-a/[0-9a-f]+)$}m;
$ctl_key //= '(none)';
is_deeply([ $etcd->keys('interop-a/') ], [$ctl_key], "etcdctl's key is the only one under interop-a/");

is($s->query_safe(q{SELECT etcd_try_lock('interop-a') IS NULL}), 't',
	'etcd_try_lock returns NULL while etcdctl holds');
is_deeply([ $etcd->keys('interop-a/') ], [$ctl_key], 'the failed try left no key');
is($s->query_safe(q{SELECT etcd_try_lock('interop-a', NULL, '300 ms') IS NULL}), 't',
	'etcd_try_lock with a wait returns NULL while etcdctl holds');
is_deeply([ $etcd->keys('interop-a/') ], [$ctl_key], 'the failed timed try left no key');

$s->start(q{SELECT etcd_lock('interop-a')});
ok( poll_until(sub {
			$node->safe_psql('postgres',
				qq{SELECT state FROM etcd_locks WHERE pid = $pid AND key = 'interop-a'}) eq 'waiting'
		}, $BOUND, 'etcd_lock to wait'),
	'etcd_lock waits while etcdctl holds (etcd_locks: waiting)');
my $lease_a =
  sprintf('%x', $node->safe_psql('postgres', qq{SELECT lease_id FROM etcd_locks WHERE pid = $pid}));
is_deeply([ sort $etcd->keys('interop-a/') ], [ sort($ctl_key, "interop-a/$lease_a") ],
	"PostgreSQL's waiter key is interop-a/<its lease in hex>, next to etcdctl's");
ok(running($ctl), 'etcdctl still holds while PostgreSQL waits');
ok(!$s->done, 'PostgreSQL has not acquired while etcdctl holds');

my $t0 = time;
$ctl->{h}->signal('INT');
ok(wait_exit($ctl), 'etcdctl exits on SIGINT');
my ($acquired, $ha, $err) = $s->finish($BOUND);
ok($acquired && $ha ne '', 'PostgreSQL acquires once etcdctl let go')
  or diag 'psql stderr: ' . ($err // '(still waiting)');
note sprintf('PostgreSQL acquired %.3f s after SIGINT to etcdctl', time - $t0);
$ha = '(none)' unless $acquired && $ha ne '';
is($ha, "interop-a/$lease_a", 'the handle is NAME/<lease id in hex>');
is($node->safe_psql('postgres', qq{SELECT state FROM etcd_locks WHERE pid = $pid}),
	'held', 'etcd_locks shows it held');
is_deeply([ $etcd->keys('interop-a/') ], [$ha], "etcdctl's key is gone, PostgreSQL's is the only one");
is($s->query_safe(qq{SELECT etcd_unlock('$ha')}), 't', 'PostgreSQL releases interop-a');
is(scalar($etcd->keys('interop-a/')), 0, 'no key left under interop-a/');

# ---------------------------------------------------------------------------
# (b) PostgreSQL holds; etcdctl cannot take the lock until PostgreSQL unlocks
# ---------------------------------------------------------------------------
my $hb = $s->query_safe(q{SELECT etcd_lock('interop-b')});
my ($lease_id, $token) = split /\|/,
  $node->safe_psql('postgres', qq{SELECT lease_id, fencing_token FROM etcd_locks WHERE pid = $pid});
my $lease_hex = sprintf('%x', $lease_id);
like($hb, qr{^interop-b/[1-9a-f][0-9a-f]*$},
	'the key layout is NAME/<lower-case hex, no padding>, as etcd\'s recipe');
is($hb, "interop-b/$lease_hex", 'the hex in the key is etcd_locks.lease_id');
ok((grep { $_ eq $lease_hex } $etcd->leases),
	'that lease exists in etcd');
like($etcd->etcdctl('lease', 'timetolive', '--keys', $lease_hex), qr/\Q$hb\E/,
	'the key is attached to that lease');
like($etcd->etcdctl('get', $hb, '-w', 'fields'), qr/"CreateRevision" : $token\n/,
	'the fencing token is the key\'s create_revision');

$ctl = etcdctl_lock('interop-b', 'echo', 'got');
ok(poll_until(sub { scalar($etcd->keys('interop-b/')) == 2 }, $BOUND, 'etcdctl to queue'),
	"etcdctl's waiter key shows up under interop-b/");
my ($ctl_waiter) = grep { $_ ne $hb } $etcd->keys('interop-b/');
like($ctl_waiter // '', qr{^interop-b/[0-9a-f]+$}, "etcdctl's waiter key has the same layout");
# one more round trip through etcd, for etcdctl to act on what it saw
is(scalar($etcd->keys('interop-b/')), 2, 'both keys still there');
ok(running($ctl), 'etcdctl is still waiting while PostgreSQL holds');
unlike($ctl->{out}, qr/got/, 'etcdctl did not get the lock while PostgreSQL holds');

$t0 = time;
is($s->query_safe(qq{SELECT etcd_unlock('$hb')}), 't', 'PostgreSQL releases interop-b');
ok(wait_output($ctl, qr/^got$/m), 'etcdctl gets the lock after PostgreSQL unlocked');
ok(wait_exit($ctl), 'etcdctl ran its command and exited');
note sprintf('etcdctl got the lock %.3f s after etcd_unlock', time - $t0);
ok($ctl->{h}->finish, 'etcdctl exited with status 0')
  or diag 'etcdctl exit status ' . ($ctl->{h}->full_result >> 8) . ", stderr: $ctl->{err}";
ok( poll_until(sub { scalar($etcd->keys('interop-b/')) == 0 }, $BOUND, 'no key under interop-b/'),
	'no key left under interop-b/');

# PostgreSQL can take it again at once
my $hb2 = $s->query_safe(q{SELECT etcd_try_lock('interop-b')});
is($hb2, $hb, 'PostgreSQL takes interop-b again (same lease, same key)');
$s->query_safe('SELECT etcd_unlock_all()');

$s->quit;
# etcdctl leaves its own session lease to expire (--ttl, 10 s); PostgreSQL's
# leases must go at once with the session.
my %pg_leases = map { $_ => 1 } ($lease_a, $lease_hex);
ok( poll_until(sub { !grep { $pg_leases{$_} } $etcd->leases }, $BOUND, 'PostgreSQL leases revoked'),
	"PostgreSQL's leases are revoked when its session ends");
is(scalar($etcd->keys('interop-')), 0, 'no key left in etcd');
is($node->safe_psql('postgres', 'SELECT 1'), '1', 'the server still answers');
unlike(slurp_file($node->logfile), qr/terminated by signal/, 'no backend crashed');

$node->stop;
done_testing();
