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

sub hostile
{
	my ($mode) = @_;
	return hostile_endpoint($mode, $^X, "$dir/server.pl", $mode, 'PORT');
}

my $etcd = EtcdLockTest::Etcd->new(name => 'hostile_etcd');
# this server speaks HTTP/1.1 only: the gateway's transport (t/017 plays a
# hostile gRPC endpoint)
my $node = pg_node('hostile', $etcd->url, "etcd_lock.transport = 'json'\n");

# What each mode must give: SQLSTATE, the message (a regex source, %EP% the
# endpoint) and the detail (undef: any).
my %expect = (
	garbage => [ '08P01', 'invalid response from etcd at %EP%', qr/not a JSON object/ ],
	garbage500 => [ '08P01', 'invalid response from etcd at %EP%', qr/HTTP status 500/ ],
	truncated => [ '08P01', 'invalid response from etcd at %EP%', qr/not a JSON object/ ],
	wrongtypes => [ '08P01', 'invalid response from etcd', qr/The field "ID" is missing, malformed or not positive/ ],
	deep => [ '08P01', 'invalid response from etcd at %EP%', qr/not a JSON object/ ],
	huge => [ '08P01', 'invalid response from etcd at %EP%', qr/response is larger than/ ],
	headers => [ '08006', '%EP%', undef ],
	silent => [ '08006', 'etcd at %EP% did not answer within etcd_lock.request_timeout \(1000 ms\)', undef ],
	close => [ '08006', 'etcd at %EP% closed the connection without answering', undef ],
);
my @modes = qw(garbage garbage500 truncated wrongtypes deep huge headers silent close);

hostile_suite($node, $etcd, \&hostile, \%expect, \@modes,
	seconds => $TIMEOUT_S + $MARGIN, kb => $MAX_KB, worker_skip => ['garbage500']);

$node->stop;
done_testing();
