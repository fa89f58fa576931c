# A broken or hostile gRPC endpoint must not hurt the server, as t/012 shows
# for the JSON gateway.  t/grpc_fake.py plays one, an HTTP/2 server with
# prior knowledge that answers every call in one broken way: a message that
# is not protobuf, a frame cut short, a compressed frame, a field of the
# wrong wire type or longer than its message, a 5 MB answer, no
# grpc-status, an error status, HTTP status 500, nothing at all, or a closed
# connection.  For each, etcd_lock() gets the right SQLSTATE within
# request_timeout plus a margin, the backend's memory stays bounded, and
# nothing crashes.  Then the lease worker meets each of them while it renews
# a lease, and must survive.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use EtcdLockTest;
use IPC::Run;
use IO::Socket::INET;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $TIMEOUT_S = 1;          # etcd_lock.request_timeout, set by pg_node
my $MARGIN = 5;             # allowed on top of it
my $MAX_KB = 100 * 1024;    # memory bound for a backend and the worker
my $PYTHON = '/usr/bin/python3';

plan skip_all => 'the fake gRPC server needs python3-h2'
  unless -x $PYTHON && system($PYTHON, '-c', 'import h2') == 0;

my %server;
my @servers;
sub hostile
{
	my ($mode) = @_;
	return $server{$mode} if $server{$mode};
	my $port = PostgreSQL::Test::Cluster::get_free_port();
	my $log = "$PostgreSQL::Test::Utils::log_path/grpc_hostile_$mode.log";
	my $h = IPC::Run::start([ $PYTHON, "$FindBin::RealBin/grpc_fake.py", $mode, $port ],
		'<', \undef, '>>', $log, '2>&1');
	push @servers, $h;
	poll_until(sub { IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port, Proto => 'tcp') },
		30, "fake gRPC server $mode to listen", 0.02)
	  or die "fake gRPC server $mode did not start";
	return $server{$mode} = "http://127.0.0.1:$port";
}

END
{
	local $?;
	for my $h (@servers)
	{
		$h->signal('KILL');
		eval { $h->finish; };
	}
}

my $etcd = EtcdLockTest::Etcd->new(name => 'grpc_hostile_etcd');
my $node = pg_node('grpc_hostile', $etcd->url, "etcd_lock.transport = 'grpc'\n");

# What each mode must give: SQLSTATE, the message (a regex source, %EP% the
# endpoint) and the detail.
my %expect = (
	garbage => [ '08P01', 'invalid response from etcd at %EP%', qr/unsupported wire type/ ],
	truncated => [ '08P01', 'invalid response from etcd at %EP%', qr/not exactly one whole message/ ],
	compressed => [ '08P01', 'invalid response from etcd at %EP%', qr/flagged 1/ ],
	wiretype => [ '08P01', 'invalid response from etcd at %EP%', qr/wrong wire type/ ],
	overlong => [ '08P01', 'invalid response from etcd at %EP%', qr/longer than the message/ ],
	huge => [ '08P01', 'invalid response from etcd at %EP%', qr/response is larger than/ ],
	nostatus => [ '08P01', 'invalid response from etcd at %EP%', qr/no grpc-status/ ],
	http500 => [ '08P01', 'invalid response from etcd at %EP%', qr/HTTP status 500/ ],
	unavailable => [ '08006', 'etcd at %EP% rejected the request', qr/etcdserver: no leader/ ],
	silent => [ '08006', 'etcd at %EP% did not answer within etcd_lock.request_timeout \(1000 ms\)', qr// ],
	close => [ '08006', '%EP%', qr// ],
);
my @modes = qw(garbage truncated compressed wiretype overlong huge nostatus http500
  unavailable silent close);

my $s = session($node);
my $pid = $s->pid;
my %observed;

for my $mode (@modes)
{
	my $ep = hostile($mode);
	set_conf($node, [$s], 'etcd_lock.endpoints' => $ep);
	my ($out, $err, undef, $elapsed) = $s->query(q{SELECT etcd_lock('x')});
	my ($code, $msg, $detail) = @{ $expect{$mode} };
	my $qep = quotemeta($ep);
	$msg =~ s/%EP%/$qep/g;
	note "$mode: $err";
	my $got = sqlstate($err);
	$observed{$mode} = sprintf('%s: %s (%.2f s)', $got, errmsg($err), $elapsed);
	is($out, '', "$mode: no handle");
	is($got, $code, "$mode: SQLSTATE $code");
	like(errmsg($err), qr/$msg/, "$mode: a clear message");
	like($err, qr/DETAIL:  [^\n]*$detail/, "$mode: the detail says what was wrong")
	  if "$detail" ne "${\ qr//}";
	cmp_ok($elapsed, '<', $TIMEOUT_S + $MARGIN, sprintf('%s: within the timeout plus %d s (%.2f s)',
			$mode, $MARGIN, $elapsed));
	my $hwm = proc_kb($pid, 'VmHWM');
	cmp_ok($hwm, '<', $MAX_KB, "$mode: the backend's peak memory stays bounded ($hwm kB)");
	is($s->query_safe('SELECT 1'), '1', "$mode: the session goes on");
	server_ok($node, $mode);
}

# back to the real etcd, over gRPC: the same session locks
set_conf($node, [$s], 'etcd_lock.endpoints' => $etcd->url);
my $h = $s->query_safe(q{SELECT etcd_lock('x')});
like($h, qr{^etcd_lock/x/[0-9a-f]+$}, 'back on etcd: the same session locks');
is($s->query_safe('SELECT etcd_unlock_all()'), '1', 'back on etcd: and unlocks');
is_deeply([ $etcd->keys('etcd_lock/') ], [], 'no key left in etcd');
is_deeply([ $etcd->leases ], [], 'no lease left in etcd');

# ---------------------------------------------------------------------------
# The worker meets each hostile endpoint while it renews a ttl-6 lease, then
# etcd is back: the lock must survive, and so must the worker.
# ---------------------------------------------------------------------------
my @wpids = worker_pids($node);
is(scalar(@wpids), 1, 'one lease worker runs');
my $wpid = $wpids[0];

for my $mode (grep { $_ ne 'http500' } @modes)
{
	my $ep = hostile($mode);
	$h = $s->query_safe(q{SELECT etcd_lock('w', 6)});
	my $lease = lease_of($h);
	my $f0 = $node->safe_psql('postgres', 'SELECT failures FROM etcd_lock_stats');
	set_conf($node, [$s], 'etcd_lock.endpoints' => $ep);
	ok( $node->poll_query_until('postgres', qq{SELECT failures > $f0 OR EXISTS
			(SELECT FROM etcd_locks WHERE key = 'w' AND state = 'lost') FROM etcd_lock_stats}),
		"worker vs $mode: a keepalive went to it");
	set_conf($node, [$s], 'etcd_lock.endpoints' => $etcd->url);
	is_deeply([ worker_pids($node) ], [$wpid], "worker vs $mode: the same worker still runs");
	my $hwm = proc_kb($wpid, 'VmHWM');
	cmp_ok($hwm, '<', $MAX_KB, "worker vs $mode: its peak memory stays bounded ($hwm kB)");
	ok( poll_until(sub {
				my ($ok, $o) = $etcd->try_etcdctl('lease', 'timetolive', $lease);
				$ok && $o =~ /remaining\([56]s\)/ }, 10, "worker vs $mode: a renewal on etcd"),
		"worker vs $mode: renewed on etcd afterwards");
	is($node->safe_psql('postgres', q{SELECT state FROM etcd_locks WHERE key = 'w'}), 'held',
		"worker vs $mode: the lock is still held");
	my ($out, $err) = $s->query(qq{SELECT etcd_unlock('$h')});
	is($out, 't', "worker vs $mode: etcd_unlock returns true");
	$s->query('SELECT etcd_unlock_all()');
	is_deeply([ $etcd->leases ], [], "worker vs $mode: no lease left");
}
server_ok($node, 'worker');
unlike(slurp_file($node->logfile), qr/lease worker" \(PID \d+\) exited/, 'the worker never exited');

$s->quit;
$etcd->wait_empty('etcd_lock/');
$etcd->no_leftovers('at the end', 'etcd_lock/');
is_deeply([ worker_pids($node) ], [$wpid], 'the worker that met every hostile endpoint still runs');
server_ok($node, 'end');

note "observed: $_ => $observed{$_}" for @modes;
$node->stop;
done_testing();
