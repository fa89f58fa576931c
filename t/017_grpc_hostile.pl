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
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $TIMEOUT_S = 1;          # etcd_lock.request_timeout, set by pg_node
my $MARGIN = 5;             # allowed on top of it
my $MAX_KB = 100 * 1024;    # memory bound for a backend and the worker
my $PYTHON = '/usr/bin/python3';

plan skip_all => 'the fake gRPC server needs python3-h2'
  unless -x $PYTHON && system($PYTHON, '-c', 'import h2') == 0;

sub hostile
{
	my ($mode) = @_;
	return hostile_endpoint($mode, $PYTHON, "$FindBin::RealBin/grpc_fake.py", $mode, 'PORT');
}

my $etcd = EtcdLockTest::Etcd->new(name => 'grpc_hostile_etcd');
my $node = pg_node('grpc_hostile', $etcd->url, "etcd_lock.transport = 'grpc'\n");

# What each mode must give: SQLSTATE, the message (a regex source, %EP% the
# endpoint) and the detail (undef: any).
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
	silent => [ '08006', 'etcd at %EP% did not answer within etcd_lock.request_timeout \(1000 ms\)', undef ],
	close => [ '08006', '%EP%', undef ],
);
my @modes = qw(garbage truncated compressed wiretype overlong huge nostatus http500
  unavailable silent close);

hostile_suite($node, $etcd, \&hostile, \%expect, \@modes,
	seconds => $TIMEOUT_S + $MARGIN, kb => $MAX_KB, worker_skip => ['http500']);

$node->stop;
done_testing();
