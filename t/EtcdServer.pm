# t/EtcdServer.pm
#
# A real etcd for TAP tests: started with IPC::Run on free loopback ports
# with a temporary data directory, so a test can stop, kill, pause and
# restart it.  Also a helper for PostgreSQL nodes that preload etcd_lock.
package EtcdServer;

use strict;
use warnings;

use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my @servers;

sub new
{
	my ($class, %opts) = @_;
	my $self = bless {
		name => $opts{name} // 'etcd',
		client_port => PostgreSQL::Test::Cluster::get_free_port(),
		peer_port => PostgreSQL::Test::Cluster::get_free_port(),
		extra => $opts{extra} // [],
	}, $class;
	$self->{dir} = PostgreSQL::Test::Utils::tempdir("etcd_$self->{name}");
	$self->{log} = "$PostgreSQL::Test::Utils::log_path/$self->{name}.log";
	push @servers, $self;
	$self->start;
	return $self;
}

sub url { my $self = shift; return "http://127.0.0.1:$self->{client_port}"; }

sub start
{
	my $self = shift;
	my $peer = "http://127.0.0.1:$self->{peer_port}";
	my @cmd = (
		'etcd', '--name', $self->{name},
		'--data-dir', "$self->{dir}/data",
		'--listen-client-urls', $self->url,
		'--advertise-client-urls', $self->url,
		'--listen-peer-urls', $peer,
		'--initial-advertise-peer-urls', $peer,
		'--initial-cluster', "$self->{name}=$peer",
		'--logger=zap', '--log-outputs=stderr', '--unsafe-no-fsync',
		@{ $self->{extra} });
	$self->{handle} = IPC::Run::start(\@cmd, '<', \undef, '>>', $self->{log}, '2>&1');
	$self->wait_healthy;
	return;
}

# Poll until etcd answers a linearizable read.
sub wait_healthy
{
	my $self = shift;
	for (1 .. 300)
	{
		my ($out, $err) = ('', '');
		my $ok = IPC::Run::run(
			[ 'etcdctl', '--endpoints', $self->url, '--dial-timeout=1s', '--command-timeout=1s',
			  'get', 'health-probe' ],
			'<', \undef, '>', \$out, '2>', \$err);
		return 1 if $ok;
		usleep(100_000);
	}
	die "etcd $self->{name} did not become healthy, see $self->{log}";
}

sub pid { my $self = shift; return $self->{handle}{KIDS}[0]{PID}; }

# Stop etcd: TERM by default, or the signal given (KILL for a crash).
sub stop
{
	my ($self, $sig) = @_;
	return unless $self->{handle};
	kill 'CONT', $self->pid;
	kill($sig // 'TERM', $self->pid);
	eval { $self->{handle}->finish; };
	$self->{handle} = undef;
	return;
}

# SIGSTOP, then wait until every thread of etcd has stopped: kill returns
# before the signal has taken effect.
sub pause
{
	my $self = shift;
	my $pid = $self->pid;
	kill 'STOP', $pid;
	for (1 .. 200)
	{
		my @running = grep {
			open(my $fh, '<', "$_/stat") or next;
			my $stat = <$fh>;
			close $fh;
			$stat =~ /\)\s+(\S)/ && $1 ne 'T' && $1 ne 't';
		} glob("/proc/$pid/task/*");
		return if !@running;
		usleep(10_000);
	}
	die "etcd $self->{name} did not stop";
}
sub resume { my $self = shift; kill 'CONT', $self->pid; return; }

# Run etcdctl against this etcd; returns stdout, dies on failure.
sub etcdctl
{
	my ($self, @args) = @_;
	my ($out, $err) = ('', '');
	IPC::Run::run([ 'etcdctl', '--endpoints', $self->url, @args ],
		'<', \undef, '>', \$out, '2>', \$err)
	  or die "etcdctl @args failed: $err";
	return $out;
}

# Keys under a prefix, as a list.
sub keys
{
	my ($self, $prefix) = @_;
	return grep { $_ ne '' } split /\n/, $self->etcdctl('get', '--prefix', $prefix, '--keys-only');
}

# Lease IDs that etcd still has, in lower-case hex without leading zeros, as
# in lock keys (etcdctl pads them to 16 digits).
sub leases
{
	my $self = shift;
	my @lines = split /\n/, $self->etcdctl('lease', 'list');
	shift @lines;    # "found N leases"
	s/^0+(?=[0-9a-f])// for @lines;
	return @lines;
}

# Wait until the condition returns true, polling; fails the test on timeout.
sub poll_until
{
	my ($self, $what, $cond, $timeout) = @_;
	$timeout //= $PostgreSQL::Test::Utils::timeout_default;
	my $end = time + $timeout;
	while (time < $end)
	{
		return 1 if $cond->();
		usleep(50_000);
	}
	fail("timed out waiting for: $what");
	return 0;
}

# A PostgreSQL node that preloads etcd_lock and points it at the etcd(s).
sub pg_node
{
	my ($name, $endpoints, $extra_conf) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init;
	$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'etcd_lock'
etcd_lock.endpoints = '$endpoints'
etcd_lock.request_timeout = '1s'
} . ($extra_conf // ''));
	$node->start;
	$node->safe_psql('postgres', 'CREATE EXTENSION etcd_lock');
	return $node;
}

END
{
	local $?;
	$_->stop('KILL') for grep { $_->{handle} } @servers;
}

1;
