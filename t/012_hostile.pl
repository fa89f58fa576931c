# A broken or hostile endpoint must not hurt the server.  The test plays one
# with a loopback HTTP server of its own, which answers every request with
# garbage, truncated JSON, a 50 MB body, JSON nested 100000 deep, endless
# headers, or nothing at all (it accepts and never answers, or closes at
# once).  For each, etcd_lock() gets a clear class-08 error within
# request_timeout plus a margin, the backend's memory stays bounded, and
# nothing crashes.  Then the lease worker meets each of them in turn while it
# renews a lease, and must survive.
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
use Time::HiRes qw(time);

my $TIMEOUT_S = 1;          # etcd_lock.request_timeout, set by pg_node
my $MARGIN = 5;             # allowed on top of it
my $MAX_KB = 100 * 1024;    # memory bound for a backend and the worker

# The hostile server: one process per mode, a child per connection.
my $server_code = <<'PERL';
use strict;
use warnings;
use IO::Socket::INET;
$SIG{CHLD} = 'IGNORE';
$SIG{PIPE} = 'IGNORE';
my ($mode, $port) = @ARGV;
my $l = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => $port,
	Listen => 64, ReuseAddr => 1, Proto => 'tcp') or die "listen $port: $!";
print "listening $port\n";
my $parent = $$;
while (1)
{
	my $c = $l->accept or next;
	my $pid = fork;
	die "fork: $!" unless defined $pid;
	if ($pid) { close $c; next; }
	close $l;
	$c->autoflush(1);
	serve($c);
	exit 0;
}

# Read one request (headers and Content-Length body); false at EOF.
sub read_request
{
	my ($c) = @_;
	my $buf = '';
	while ($buf !~ /\r\n\r\n/)
	{
		my $n = sysread($c, $buf, 65536, length $buf);
		return 0 unless $n;
	}
	my ($head, $body) = split /\r\n\r\n/, $buf, 2;
	my $len = $head =~ /^Content-Length:\s*(\d+)/mi ? $1 : 0;
	while (length($body) < $len)
	{
		my $n = sysread($c, $body, 65536, length $body);
		return 0 unless $n;
	}
	return 1;
}

sub reply
{
	my ($c, $body, $status) = @_;
	$status //= '200 OK';
	print $c "HTTP/1.1 $status\r\nContent-Type: application/json\r\n"
	  . 'Content-Length: ' . length($body) . "\r\n\r\n" . $body;
}

sub serve
{
	my ($c) = @_;
	while (read_request($c))
	{
		exit 0 if getppid() != $parent;
		if ($mode eq 'garbage')
		{
			reply($c, "\x00\xff<html>garbage}{\"ID\":]] not json at all\n");
		}
		elsif ($mode eq 'garbage500')
		{
			reply($c, "<html><body>502 Bad Gateway</body></html>", '500 Internal Server Error');
		}
		elsif ($mode eq 'truncated')
		{
			reply($c, '{"header":{"cluster_id":"14841639068965178418","member_id":"10276657743932975437",'
				  . '"revision":"5","raft_term":"2"},"ID":"75875');
		}
		elsif ($mode eq 'wrongtypes')
		{
			# valid JSON, nothing where etcd's fields should be
			reply($c, '{"header":[],"ID":{"x":1},"TTL":[1,2],"result":"no","succeeded":"yes",'
				  . '"responses":7,"kvs":null,"token":123,"leader":-1}');
		}
		elsif ($mode eq 'deep')
		{
			reply($c, ('[' x 100000) . (']' x 100000));
		}
		elsif ($mode eq 'huge')
		{
			# 50 MB, streamed in chunks, valid JSON if anyone read it all
			print $c "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
			  . "Transfer-Encoding: chunked\r\n\r\n";
			my $chunk = 'a' x 65536;
			my $head = '{"header":{},"x":"';
			printf $c "%x\r\n%s\r\n", length $head, $head or exit 0;
			for (1 .. 800)
			{
				printf $c "%x\r\n%s\r\n", length $chunk, $chunk or exit 0;
			}
			print $c "2\r\n\"}\r\n0\r\n\r\n" or exit 0;
		}
		elsif ($mode eq 'headers')
		{
			# endless header lines, never a body
			print $c "HTTP/1.1 200 OK\r\n";
			my $line = 'X-Junk: ' . ('j' x 1000) . "\r\n";
			while (1) { print $c $line x 64 or exit 0; }
		}
		elsif ($mode eq 'silent')
		{
			# never answer; go when the client gives up and closes
			my $x;
			while (sysread($c, $x, 65536)) { }
			exit 0;
		}
		elsif ($mode eq 'close')
		{
			exit 0;    # closes the connection without a byte
		}
	}
}
PERL

my $dir = PostgreSQL::Test::Utils::tempdir('hostile');
open my $fh, '>', "$dir/server.pl" or die $!;
print $fh $server_code;
close $fh;

my %server;
my @servers;
sub hostile
{
	my ($mode) = @_;
	return $server{$mode} if $server{$mode};
	my $port = PostgreSQL::Test::Cluster::get_free_port();
	my $log = "$PostgreSQL::Test::Utils::log_path/hostile_$mode.log";
	my $h = IPC::Run::start([ $^X, "$dir/server.pl", $mode, $port ],
		'<', \undef, '>>', $log, '2>&1');
	push @servers, $h;
	poll_until(sub { IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port, Proto => 'tcp') },
		30, "hostile server $mode to listen", 0.02)
	  or die "hostile server $mode did not start";
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

my $etcd = EtcdLockTest::Etcd->new(name => 'hostile_etcd');
# this server speaks HTTP/1.1 only: the gateway's transport (t/017 plays a
# hostile gRPC endpoint)
my $node = pg_node('hostile', $etcd->url, "etcd_lock.transport = 'json'\n");

# What each mode must give: SQLSTATE, the message (a regex source, %EP% the
# endpoint) and the detail.
my %expect = (
	garbage => [ '08P01', 'invalid response from etcd at %EP%', qr/not a JSON object/ ],
	garbage500 => [ '08P01', 'invalid response from etcd at %EP%', qr/HTTP status 500/ ],
	truncated => [ '08P01', 'invalid response from etcd at %EP%', qr/not a JSON object/ ],
	wrongtypes => [ '08P01', 'invalid response from etcd', qr/The field "ID" is missing, malformed or not positive/ ],
	deep => [ '08P01', 'invalid response from etcd at %EP%', qr/not a JSON object/ ],
	huge => [ '08P01', 'invalid response from etcd at %EP%', qr/response is larger than/ ],
	headers => [ '08006', '%EP%', qr// ],
	silent => [ '08006', 'etcd at %EP% did not answer within etcd_lock.request_timeout \(1000 ms\)', qr// ],
	close => [ '08006', 'etcd at %EP% closed the connection without answering', qr// ],
);
my @modes = qw(garbage garbage500 truncated wrongtypes deep huge headers silent close);

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
	like($got, qr/^08/, "$mode: a class-08 error");
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

# back to the real etcd: the same session locks
set_conf($node, [$s], 'etcd_lock.endpoints' => $etcd->url);
my $h = $s->query_safe(q{SELECT etcd_lock('x')});
like($h, qr{^etcd_lock/x/[0-9a-f]+$}, 'back on etcd: the same session locks');
is($s->query_safe('SELECT etcd_unlock_all()'), '1', 'back on etcd: and unlocks');
is_deeply([ $etcd->keys('etcd_lock/') ], [], 'no key left in etcd');
is_deeply([ $etcd->leases ], [], 'no lease left in etcd');

# ---------------------------------------------------------------------------
# The worker meets each hostile endpoint while it renews a lease.  A ttl-6
# lock: a keepalive every 2 s, a retry 1 s after a failure.  The endpoint is
# hostile until one keepalive failed (at most 2 s, plus 1 s for 'silent'),
# then etcd is back, and the worker's retry renews the lease before it can
# expire: the lock must survive, and so must the worker.
# ---------------------------------------------------------------------------
my @wpids = worker_pids($node);
is(scalar(@wpids), 1, 'one lease worker runs');
my $wpid = $wpids[0];

for my $mode (grep { $_ ne 'garbage500' } @modes)
{
	my $ep = hostile($mode);
	$h = $s->query_safe(q{SELECT etcd_lock('w', 6)});
	my $lease = lease_of($h);
	my $f0 = $node->safe_psql('postgres', 'SELECT failures FROM etcd_lock_stats');
	set_conf($node, [$s], 'etcd_lock.endpoints' => $ep);
	# the worker met it: a keepalive failed, or (wrongly) found the lease gone
	ok( $node->poll_query_until('postgres', qq{SELECT failures > $f0 OR EXISTS
			(SELECT FROM etcd_locks WHERE key = 'w' AND state = 'lost') FROM etcd_lock_stats}),
		"worker vs $mode: a keepalive went to it");
	set_conf($node, [$s], 'etcd_lock.endpoints' => $etcd->url);
	is_deeply([ worker_pids($node) ], [$wpid], "worker vs $mode: the same worker still runs");
	my $hwm = proc_kb($wpid, 'VmHWM');
	cmp_ok($hwm, '<', $MAX_KB, "worker vs $mode: its peak memory stays bounded ($hwm kB)");
	# renewed again on etcd: the remaining TTL is back near 6 s
	ok( poll_until(sub {
				my ($ok, $o) = $etcd->try_etcdctl('lease', 'timetolive', $lease);
				$ok && $o =~ /remaining\([56]s\)/ }, 10, "worker vs $mode: a renewal on etcd"),
		"worker vs $mode: renewed on etcd afterwards");
	is($node->safe_psql('postgres', q{SELECT state FROM etcd_locks WHERE key = 'w'}), 'held',
		"worker vs $mode: the lock is still held");
	my ($out, $err) = $s->query(qq{SELECT etcd_unlock('$h')});
	is($out, 't', "worker vs $mode: etcd_unlock returns true");
	note "worker vs $mode: unlock said: $err" if $err;
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
