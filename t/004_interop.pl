# Interoperability with etcd's own lock recipe: with etcd_lock.prefix = '' a
# PostgreSQL holder and an `etcdctl lock NAME` holder exclude each other, in
# both directions, and the PostgreSQL key layout is etcd's: NAME/<lease id in
# lower-case hex, unpadded>.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use EtcdServer;
use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

# generous bound for anything that should happen promptly
my $BOUND = 20;

my $etcd = EtcdServer->new(name => 'interop');
my $node = EtcdServer::pg_node('interop', $etcd->url);

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

# Poll until the process's stdout matches, or it exits, or $BOUND passes.
sub wait_output
{
	my ($p, $re) = @_;
	my $end = time + $BOUND;
	while (time < $end)
	{
		$p->{h}->pump_nb if $p->{h}->pumpable;
		return 1 if $p->{out} =~ $re;
		last unless $p->{h}->pumpable;
		usleep(20_000);
	}
	return $p->{out} =~ $re ? 1 : 0;
}

# Poll until the process has exited; returns whether it did.
sub wait_exit
{
	my ($p) = @_;
	my $end = time + $BOUND;
	while (time < $end)
	{
		return 1 unless running($p);
		usleep(20_000);
	}
	return 0;
}

# Poll until a background psql's stdout matches.
sub wait_psql_output
{
	my ($bg, $re) = @_;
	my $end = time + $BOUND;
	while (time < $end)
	{
		$bg->{run}->pump_nb;
		return 1 if $bg->{stdout} =~ $re;
		usleep(20_000);
	}
	return $bg->{stdout} =~ $re ? 1 : 0;
}

my $s = $node->background_psql('postgres');
$s->query_safe(q{SET etcd_lock.prefix = ''});
my $pid = $s->query_safe('SELECT pg_backend_pid()');

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

# no end markers: the session goes on with query_safe, which wants no stderr
EtcdServer::start_statement($s, q{SELECT etcd_lock('interop-a') AS h \gset
\echo acquired :h}, end_markers => 0);
ok( EtcdServer::poll_sql($node,
		qq{SELECT state FROM etcd_locks WHERE pid = $pid AND key = 'interop-a'}, 'waiting', $BOUND),
	'etcd_lock waits while etcdctl holds (etcd_locks: waiting)');
my $lease_a =
  sprintf('%x', $node->safe_psql('postgres', qq{SELECT lease_id FROM etcd_locks WHERE pid = $pid}));
is_deeply([ sort $etcd->keys('interop-a/') ], [ sort($ctl_key, "interop-a/$lease_a") ],
	"PostgreSQL's waiter key is interop-a/<its lease in hex>, next to etcdctl's");
ok(running($ctl), 'etcdctl still holds while PostgreSQL waits');
unlike($s->{stdout}, qr/acquired/, 'PostgreSQL has not acquired while etcdctl holds');

my $t0 = time;
$ctl->{h}->signal('INT');
ok(wait_exit($ctl), 'etcdctl exits on SIGINT');
ok(wait_psql_output($s, qr/acquired (\S+)\n/), 'PostgreSQL acquires once etcdctl let go')
  or diag "psql stderr: $s->{stderr}";
my ($ha) = $s->{stdout} =~ /acquired (\S+)\n/;
$s->{stdout} = '';
note sprintf('PostgreSQL acquired %.3f s after SIGINT to etcdctl', time - $t0);
$ha //= '(none)';
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
ok( $etcd->poll_until('etcdctl queues', sub { scalar($etcd->keys('interop-b/')) == 2 }, $BOUND),
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
ok( $etcd->poll_until('no key under interop-b/', sub { scalar($etcd->keys('interop-b/')) == 0 },
		$BOUND),
	'no key left under interop-b/');

# PostgreSQL can take it again at once
my $hb2 = $s->query_safe(q{SELECT etcd_try_lock('interop-b')});
is($hb2, $hb, 'PostgreSQL takes interop-b again (same lease, same key)');
$s->query_safe('SELECT etcd_unlock_all()');

$s->quit;
# etcdctl leaves its own session lease to expire (--ttl, 10 s); PostgreSQL's
# leases must go at once with the session.
my %pg_leases = map { $_ => 1 } ($lease_a, $lease_hex);
ok( $etcd->poll_until('PostgreSQL leases revoked',
		sub { !grep { $pg_leases{$_} } $etcd->leases }, $BOUND),
	"PostgreSQL's leases are revoked when its session ends");
is(scalar($etcd->keys('interop-')), 0, 'no key left in etcd');
is($node->safe_psql('postgres', 'SELECT 1'), '1', 'the server still answers');
unlike(slurp_file($node->logfile), qr/terminated by signal/, 'no backend crashed');

$node->stop;
done_testing();
