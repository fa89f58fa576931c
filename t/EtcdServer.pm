# t/EtcdServer.pm
#
# A real etcd for TAP tests: started with IPC::Run on free loopback ports
# with a temporary data directory, so a test can stop, kill, pause and
# restart it.  Also a helper for PostgreSQL nodes that preload etcd_lock,
# and small helpers the tests share: lock handles, etcd_lock_stats, polling
# SQL, background sessions and statements that run in them.
package EtcdServer;

use strict;
use warnings;

use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

# every etcd made here or in a subclass, killed in END
my @servers;

# new(name => N, extra => [etcd flags], no_start => 1): free ports, a data
# directory and a log; started unless no_start (subclasses add fields first).
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
	$self->start unless $opts{no_start};
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
	$_ = lc for @lines;
	s/^0+(?=[0-9a-f])// for @lines;
	return @lines;
}

# Test: no key under $prefix (default: none at all) and no lease left in etcd.
sub no_leftovers
{
	my ($self, $what, $prefix) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	is_deeply([ $self->keys($prefix // '') ], [], "$what: no key left in etcd");
	is_deeply([ $self->leases ], [], "$what: no lease left in etcd");
	return;
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

# ---------------------------------------------------------------------------
# Package functions shared by the tests (call them as EtcdServer::name)
# ---------------------------------------------------------------------------

# A process's state from /proc (Linux): 'T' once every one of its threads
# has stopped, else the state letter of a thread that has not.
sub proc_state
{
	my ($pid) = @_;
	my @tasks = glob("/proc/$pid/task/*");
	return '?' unless @tasks;
	for my $task (@tasks)
	{
		open(my $fh, '<', "$task/stat") or return '?';
		my $line = <$fh>;
		close $fh;
		my ($state) = $line =~ /^\d+ \(.*\) (\S)/;
		return $state // '?' unless ($state // '') eq 'T';
	}
	return 'T';
}

# The lease ID (hex) at the end of a lock handle NAME/<lease>.
sub lease_of
{
	my ($handle) = @_;
	my ($lease) = $handle =~ m{/([0-9a-f]+)$};
	return $lease;
}

# One column of the node's etcd_lock_stats.
sub stat_value
{
	my ($node, $col) = @_;
	return $node->safe_psql('postgres', "SELECT $col FROM etcd_lock_stats");
}

# Poll a query every 50 ms until it returns $expected, for at most $bound
# seconds (a short bound, not the 180 s default); diag and 0 on timeout.
sub poll_sql
{
	my ($node, $sql, $expected, $bound) = @_;
	my $end = Time::HiRes::time() + $bound;
	my $got;
	while (1)
	{
		$got = $node->safe_psql('postgres', $sql);
		return 1 if $got eq $expected;
		last if Time::HiRes::time() > $end;
		usleep(50_000);
	}
	diag "poll_sql: gave up after $bound s on: $sql\nexpected: $expected\nlast got: $got";
	return 0;
}

# A background session that goes on after errors and reports SQLSTATEs
# (verbose errors: "ERROR:  SQLSTATE: message").
sub session
{
	my ($node, %opts) = @_;
	my $s = $node->background_psql($opts{dbname} // 'postgres', on_error_stop => 0,
		$opts{extra_params} ? (extra_params => $opts{extra_params}) : ());
	$s->query_safe('\set VERBOSITY verbose');
	return $s;
}

# Issue a statement in a background session without waiting for its end.
# Unless end_markers => 0, markers on both stdout and stderr tell
# finish_statement when it has finished.
sub start_statement
{
	my ($s, $sql, %opt) = @_;
	my $end = ($opt{end_markers} // 1) ? "\\echo statement ended\n\\warn statement ended\n" : '';
	$s->{stdout} = '';
	$s->{stderr} = '';
	$s->query_until(qr/statement started\n/, "\\echo statement started\n$sql\n$end");
	return;
}

# Wait (polling, at most $limit seconds) for the end markers of a statement
# sent with them; returns whether it ended, its stdout and its stderr.
sub finish_statement
{
	my ($s, $limit) = @_;
	my $end = Time::HiRes::time() + $limit;
	my $done = 0;
	while (1)
	{
		$s->{run}->pump_nb;
		if ($s->{stdout} =~ /statement ended\n/ && $s->{stderr} =~ /statement ended\n/)
		{
			$done = 1;
			last;
		}
		last if Time::HiRes::time() > $end || !$s->{run}->pumpable;
		usleep(10_000);
	}
	my ($out, $err) = ($s->{stdout}, $s->{stderr});
	$s->{stdout} = '';
	$s->{stderr} = '';
	$out =~ s/statement ended\n//;
	$err =~ s/statement ended\n//;
	return ($done, $out, $err);
}

END
{
	local $?;
	$_->stop('KILL') for grep { $_->{handle} } @servers;
}

1;
