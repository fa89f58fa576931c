# etcd with auth enabled and a least-privilege role: etcd_lock's user may
# read and write etcd_lock/ and nothing else (the role the README documents).
# Locks work; names cannot leave the prefix, and etcd itself refuses a key
# outside it.  The password comes from etcd_lock.password_file: the setting
# and the file's path are hidden from non-superusers; a file with the wrong
# password is 28P01, and the right one works in the same session; a missing,
# unreadable or oversized file is a clear error; the file is read at each
# authentication, so a new password written to it is used without a reload;
# and the password never shows in the server log, which logs every
# statement, every reload and DEBUG1.  The token is cached, and renewed
# transparently when it expires (etcd runs with --auth-token-ttl 3); the
# worker authenticates on its own and keeps a ttl-2 lock alive; an empty user
# gets a clear error; an etcd without auth works with the user set.
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

my $TOKEN_TTL = 3;

# Passwords that nothing else would put in the server log.
my %pw = (
	right => 'pw-right-7c1e9a',
	wrong => 'pw-wrong-3b8d52',
	rotated => 'pw-rotated-5f02c4');

# The password files, each holding its password and a line end.
my $dir = PostgreSQL::Test::Utils::tempdir('auth');
sub write_file
{
	my ($path, $content) = @_;
	open my $fh, '>', $path or die "$path: $!";
	print $fh $content;
	close $fh or die "$path: $!";
	return $path;
}
my $pw_file = write_file("$dir/pglock.pw", "$pw{right}\n");
my $wrong_file = write_file("$dir/wrong.pw", "$pw{wrong}\n");

my $etcd = EtcdLockTest::Etcd->new(name => 'auth', extra => [ '--auth-token-ttl', $TOKEN_TTL ]);
$etcd->enable_auth($pw{right});
like($etcd->etcdctl('role', 'get', 'etcd_lock_role'), qr/KV Read:\s+\[etcd_lock\/, etcd_lock0\)/,
	'etcd_lock_role may read and write etcd_lock/ only');
my ($ok, $o, $e) = $etcd->try_etcdctl('--dial-timeout=2s', 'get', 'x');
ok($ok, 'etcdctl works as root');
$ok = IPC::Run::run([ 'etcdctl', '--endpoints', $etcd->url, '--dial-timeout=2s',
		'--command-timeout=2s', 'put', 'etcd_lock/probe', 'v' ], '<', \undef, '>', \$o, '2>', \$e);
ok(!$ok, 'etcd refuses a write without credentials: auth is on');

my $node = pg_node('auth', $etcd->url, qq{
etcd_lock.user = 'pglock'
etcd_lock.password_file = '$pw_file'
log_statement = all
log_min_messages = debug1
});

my %observed;
my $s = session($node);
my $s_pid = $s->pid;

# ---------------------------------------------------------------------------
# Locks work, with one authentication for many requests
# ---------------------------------------------------------------------------
my $auth0 = $etcd->grpc_calls('Authenticate', 'OK');
my $h = $s->query_safe(q{SELECT etcd_lock('auth-basic')});
like($h, qr{^etcd_lock/auth-basic/[0-9a-f]+$}, 'a lock as etcd user pglock');
is_deeply([ $etcd->keys('etcd_lock/auth-basic/') ], [$h], 'its key is in etcd');
is($s->query_safe(qq{SELECT etcd_unlock('$h')}), 't', 'unlock');
for my $i (1 .. 5)
{
	$s->query_safe(qq{SELECT etcd_unlock(etcd_lock('auth-loop'))});
	$s->query_safe(q{BEGIN; SELECT etcd_xact_lock('auth-xact'); COMMIT;});
}
my $auths = $etcd->grpc_calls('Authenticate', 'OK') - $auth0;
note "authentications for 11 locks and their releases: $auths";
cmp_ok($auths, '<=', 2,
	'one authentication per process (the session, the worker) for 30-odd requests: the token is cached');
is(scalar($etcd->keys('etcd_lock/')), 0, 'every lock is released');
is($s->query_safe('SELECT etcd_unlock_all()'), '0', 'unlock_all drops the idle lease');
$etcd->no_leftovers('basic');

# ---------------------------------------------------------------------------
# Names stay in the prefix, and etcd enforces the role
# ---------------------------------------------------------------------------
$h = $s->query_safe(q{SELECT etcd_lock('../../registry/pods')});
like($h, qr{^etcd_lock/\.\./\.\./registry/pods/[0-9a-f]+$}, 'a name with ../ stays under etcd_lock/');
is_deeply([ $etcd->keys('etcd_lock/../../registry/pods/') ], [$h],
	'etcd holds it as a literal key under etcd_lock/');
is_deeply([ $etcd->keys('registry/') ], [], 'nothing was written under registry/');
$s->query_safe('SELECT etcd_unlock_all()');

# a superuser may move the prefix (PGC_SUSET); etcd's role still confines it
my ($out, $err);
for my $case ([ 'other/', 'x' ], [ '', 'registry/pods' ])
{
	my ($prefix, $name) = @$case;
	($out, $err) = $s->query("SET etcd_lock.prefix = '$prefix'");
	is($err, '', "superuser sets etcd_lock.prefix = '$prefix'");
	($out, $err) = $s->query("SELECT etcd_lock('$name')");
	my $code = sqlstate($err);
	$observed{"lock $prefix$name outside the role"} = "$code: " . errmsg($err);
	is($code, '42501', "prefix '$prefix': etcd refuses $prefix$name/ (permission denied, 42501)");
	like($err, qr/DETAIL:  etcdserver: permission denied/, "prefix '$prefix': etcd's reason in DETAIL");
	is($out, '', "prefix '$prefix': no handle");
	$etcd->no_leftovers("prefix '$prefix'");
}
# with an empty prefix, names map 1:1, and etcd_lock/... is still allowed
$h = $s->query_safe(q{SELECT etcd_lock('etcd_lock/inside')});
like($h, qr{^etcd_lock/inside/[0-9a-f]+$}, "prefix '': a name inside the role's prefix works");
$s->query_safe('SELECT etcd_unlock_all()');
$s->query_safe('RESET etcd_lock.prefix');
$etcd->no_leftovers('prefix reset');

# ---------------------------------------------------------------------------
# No setting holds the password; the file's path and the user are hidden
# from non-superusers
# ---------------------------------------------------------------------------
is($s->query_safe('SHOW etcd_lock.password_file'), $pw_file, 'the superuser sees the password file\'s path');
($out, $err) = $s->query(q{SET etcd_lock.password = 'x'});
is(sqlstate($err), '42602', 'there is no etcd_lock.password setting to put a password in (42602)');
$node->safe_psql('postgres', 'CREATE ROLE alice LOGIN');
my $alice = session($node, user => 'alice');
is($alice->query_safe('SELECT current_user'), 'alice', 'a non-superuser session');
superuser_only_ok($alice, "etcd_lock.$_") for qw(password_file user);
($out, $err) = $alice->query('SELECT count(*) FROM pg_file_settings');
is(sqlstate($err), '42501', 'non-superuser: pg_file_settings (which shows the file) is refused');
($out, $err) = $alice->query(q{SELECT etcd_unlock(etcd_lock('alice'))});
is($out, 't', 'the non-superuser locks with the server\'s etcd credentials');
$alice->quit;

# ---------------------------------------------------------------------------
# A file with the wrong password: 28P01, then the right file works in the
# same session.  A changed etcd_lock.password_file drops the cached token.
# ---------------------------------------------------------------------------
$s->query_safe('SELECT etcd_unlock_all()');
set_conf($node, [$s], 'etcd_lock.password_file' => $wrong_file);
my $elapsed;
($out, $err, undef, $elapsed) = $s->query(q{SELECT etcd_lock('auth-pw')});
note "wrong password: $err";
$observed{'wrong password'} = sqlstate($err) . ': ' . errmsg($err);
is(sqlstate($err), '28P01', 'wrong password: SQLSTATE 28P01');
like($err, qr/etcd authentication failed for user "pglock"/, 'wrong password: the message names the user');
like($err, qr/DETAIL:  etcdserver: authentication failed/, 'wrong password: etcd\'s reason in DETAIL');
like($err, qr/HINT:  [^\n]*etcd_lock\.password_file/, 'wrong password: the hint names etcd_lock.password_file');
unlike($err, qr/\Q$pw{wrong}\E/, 'wrong password: the error does not show the password');
cmp_ok($elapsed, '<', 10, 'wrong password: reported promptly');
is($out, '', 'wrong password: no handle');
$etcd->no_leftovers('wrong password');
server_ok($node, 'wrong password');

# postgresql.conf's value, the right file, once the override is reset
set_conf($node, [$s], 'etcd_lock.password_file' => undef);
($out, $err) = $s->query(q{SELECT etcd_lock('auth-pw')});
is($err, '', 'right password file: no error');
like($out, qr{^etcd_lock/auth-pw/[0-9a-f]+$}, 'right password file: the same session locks again');
is(scalar($s->query('SELECT etcd_unlock_all()')), '1', 'right password file: unlock');
$etcd->no_leftovers('right password file');

# ---------------------------------------------------------------------------
# A password file that cannot be used: a clear error naming the file, and
# nothing sent to etcd
# ---------------------------------------------------------------------------
my $missing_file = "$dir/no-such.pw";
my $unreadable = write_file("$dir/unreadable.pw", "$pw{right}\n");
chmod 0000, $unreadable;
my $can_read_unreadable = open(my $probe, '<', $unreadable);
close $probe if $can_read_unreadable;
my $too_long = write_file("$dir/too-long.pw", 'x' x 5000);

my @bad_files = (
	[ 'missing password file', $missing_file, '58P01',
		qr/could not open etcd password file "\Q$missing_file\E": No such file or directory/ ],
	[ 'unreadable password file', $unreadable, '42501',
		qr/could not open etcd password file "\Q$unreadable\E": Permission denied/ ],
	[ 'oversized password file', $too_long, 'F0000',
		qr/etcd password file "\Q$too_long\E" is too long/ ]);
for my $case (@bad_files)
{
	my ($what, $file, $code, $msg) = @$case;
  SKIP:
	{
		skip 'running as a user that can read a mode-000 file', 6
		  if $file eq $unreadable && $can_read_unreadable;
		my $auth_calls0 = $etcd->grpc_calls('Authenticate');
		set_conf($node, [$s], 'etcd_lock.password_file' => $file);
		($out, $err) = $s->query(q{SELECT etcd_lock('auth-file')});
		note "$what: $err";
		$observed{$what} = sqlstate($err) . ': ' . errmsg($err);
		is(sqlstate($err), $code, "$what: SQLSTATE $code");
		like($err, $msg, "$what: the message names the file");
		is($out, '', "$what: no handle");
		is($etcd->grpc_calls('Authenticate') - $auth_calls0, 0, "$what: nothing was sent to etcd to authenticate");
		$etcd->no_leftovers($what);
	}
}
set_conf($node, [$s], 'etcd_lock.password_file' => undef);
($out, $err) = $s->query(q{SELECT etcd_unlock(etcd_lock('auth-file'))});
is($out, 't', 'right password file again: the same session locks');
$s->query_safe('SELECT etcd_unlock_all()');

# ---------------------------------------------------------------------------
# A new password: the file is read at each authentication
# ---------------------------------------------------------------------------
# etcd gets a new password for pglock, which also ends pglock's tokens: the
# session's next request must authenticate again, with what the file holds.
$etcd->add_pglock($pw{rotated});
($out, $err) = $s->query(q{SELECT etcd_lock('auth-rotated')});
is(sqlstate($err), '28P01', 'password changed in etcd, not yet in the file: 28P01');
# the file now holds the new password, with a CRLF line end; no reload
write_file($pw_file, "$pw{rotated}\r\n");
($out, $err) = $s->query(q{SELECT etcd_lock('auth-rotated')});
is($err, '', 'new password in the file: no error, without a reload');
like($out, qr{^etcd_lock/auth-rotated/[0-9a-f]+$}, 'new password in the file: the same session locks');
is(scalar($s->query('SELECT etcd_unlock_all()')), '1', 'new password in the file: unlock');
# a reload changes nothing: the path is the same
$node->reload;
($out, $err) = $s->query(q{SELECT etcd_unlock(etcd_lock('auth-rotated'))});
is($out, 't', 'after a reload: the session locks with the new password');
$s->query_safe('SELECT etcd_unlock_all()');
# The lease of the attempt that failed went to the worker to revoke; the
# worker too reads the new password from the file when it authenticates.
ok($node->poll_query_until('postgres', 'SELECT revoking = 0 FROM etcd_lock_stats'),
	'new password: the worker revoked what it had to');
$etcd->wait_empty('', 30);
$etcd->no_leftovers('new password');

# ---------------------------------------------------------------------------
# The token expires while the session idles; the next call re-authenticates
# ---------------------------------------------------------------------------
$s->query_safe(q{SELECT etcd_unlock(etcd_lock('auth-idle'))});
$s->query_safe('SELECT etcd_unlock_all()');    # no lease: the worker sends nothing
my $unauth0 = $etcd->grpc_calls('LeaseGrant', 'Unauthenticated')
  + $etcd->grpc_calls('Txn', 'Unauthenticated');
$auth0 = $etcd->grpc_calls('Authenticate', 'OK');
my $fail0 = $node->safe_psql('postgres', 'SELECT failures FROM etcd_lock_stats');
# etcd drops a simple token TTL seconds after its last use, checking once a
# second: the session idles for TTL + 2 s.  Nothing outside etcd shows the
# token's end, so this is a wait on the clock; what follows checks that the
# token had indeed expired (etcd refused it once).
Time::HiRes::sleep($TOKEN_TTL + 2);
($out, $err) = $s->query(q{SELECT etcd_lock('auth-idle')});
is($err, '', 'after the token expired: no error');
like($out, qr{^etcd_lock/auth-idle/[0-9a-f]+$}, 'after the token expired: the lock works');
is($s->query_safe(qq{SELECT etcd_unlock('$out')}), 't', 'after the token expired: unlock works');
my $unauth = $etcd->grpc_calls('LeaseGrant', 'Unauthenticated')
  + $etcd->grpc_calls('Txn', 'Unauthenticated') - $unauth0;
is($unauth, 1, 'etcd refused the expired token exactly once');
is($etcd->grpc_calls('Authenticate', 'OK') - $auth0, 1, 'and the session authenticated again, once');
note 'etcd_lock_stats.failures grew by '
  . ($node->safe_psql('postgres', 'SELECT failures FROM etcd_lock_stats') - $fail0);
$s->query_safe('SELECT etcd_unlock_all()');
$etcd->no_leftovers('token expiry');

# ---------------------------------------------------------------------------
# The worker authenticates on its own and keeps a ttl-2 lock alive for 8 s,
# past several token expiries (keepalives do not refresh a token)
# ---------------------------------------------------------------------------
my $ka0 = $node->safe_psql('postgres', 'SELECT keepalives FROM etcd_lock_stats');
$fail0 = $node->safe_psql('postgres', 'SELECT failures FROM etcd_lock_stats');
$h = $s->query_safe(q{SELECT etcd_lock('auth-renew', 2)});
my $lease = lease_of($h);
like($etcd->etcdctl('lease', 'timetolive', $lease), qr/granted with TTL\(2s\)/, 'a 2 s lease');
my ($checks, $missing) = $etcd->key_kept($h, 8);
cmp_ok($checks, '>=', 8, "renewal: checked the key $checks times over 8 s");
is($missing, 0, 'renewal: the key was in etcd at every check (4 TTLs, 2 token TTLs)');
like($etcd->etcdctl('lease', 'timetolive', $lease), qr/remaining\([12]s\)/, 'renewal: the lease is alive');
my $ka = $node->safe_psql('postgres', 'SELECT keepalives FROM etcd_lock_stats') - $ka0;
cmp_ok($ka, '>=', 6, "renewal: the worker sent keepalives ($ka)");
note 'worker/backend failures during renewal: '
  . ($node->safe_psql('postgres', 'SELECT failures FROM etcd_lock_stats') - $fail0);
is($node->safe_psql('postgres', qq{SELECT state FROM etcd_locks WHERE pid = $s_pid}), 'held',
	'renewal: still held');
is($s->query_safe(qq{SELECT etcd_unlock('$h')}), 't', 'renewal: unlock returns true');
$s->query_safe('SELECT etcd_unlock_all()');
$etcd->no_leftovers('renewal');

# ---------------------------------------------------------------------------
# No user against the auth etcd
# ---------------------------------------------------------------------------
set_conf($node, [$s], 'etcd_lock.user' => '', 'etcd_lock.password_file' => '');
($out, $err, undef, $elapsed) = $s->query(q{SELECT etcd_lock('auth-nouser')});
note "empty user: $err";
my $code = sqlstate($err);
$observed{'empty etcd_lock.user'} = "$code: " . errmsg($err);
is($out, '', 'empty user: no handle');
# etcd answers 400, code 3 (InvalidArgument) "user name is empty"
is($code, '28000', 'empty user: SQLSTATE 28000 (invalid authorization specification)');
like($err, qr/ERROR:  28000: etcd at \Q${\$etcd->url}\E requires authentication/,
	'empty user: the message says etcd wants credentials, and names the endpoint');
like($err, qr/DETAIL:  etcdserver: user name is empty/, 'empty user: etcd\'s reason in DETAIL');
like($err, qr/HINT:  Set etcd_lock\.user and etcd_lock\.password_file\./, 'empty user: the hint names the settings');
cmp_ok($elapsed, '<', 10, 'empty user: reported promptly');
$etcd->no_leftovers('empty user');
# back to postgresql.conf's user and password file
set_conf($node, [$s], 'etcd_lock.user' => undef, 'etcd_lock.password_file' => undef);
($out, $err) = $s->query(q{SELECT etcd_unlock(etcd_lock('auth-nouser'))});
is($out, 't', 'user restored: the same session locks again');
$s->query_safe('SELECT etcd_unlock_all()');
$etcd->no_leftovers('user restored');

# ---------------------------------------------------------------------------
# An etcd without auth, with etcd_lock.user set: no token is sent, and locks
# work.  etcd 3.4 without auth answers 401 (Unauthenticated, "invalid auth
# token") to any Authorization header, which the metrics below would count;
# etcd 3.5 ignores the header, so there they only show nothing was refused.
# ---------------------------------------------------------------------------
my $open = EtcdLockTest::Etcd->new(name => 'noauth');
set_conf($node, [$s], 'etcd_lock.endpoints' => $open->url);
$fail0 = $node->safe_psql('postgres', 'SELECT failures FROM etcd_lock_stats');
($out, $err) = $s->query(q{SELECT etcd_lock('open', 2)});
is($err, '', 'etcd without auth: no error');
like($out, qr{^etcd_lock/open/[0-9a-f]+$}, 'etcd without auth: locks work with etcd_lock.user set');
is_deeply([ $open->keys('etcd_lock/open/') ], [$out], 'etcd without auth: the key is there');
for my $i (1 .. 5)
{
	$s->query_safe(q{SELECT etcd_unlock(etcd_lock('open-loop'))});
}
# the worker too renews without a token
$ka0 = $node->safe_psql('postgres', 'SELECT keepalives FROM etcd_lock_stats');
ok( poll_until(sub {
			$node->safe_psql('postgres', 'SELECT keepalives FROM etcd_lock_stats') >= $ka0 + 4 }, undef, 'keepalives'),
	'etcd without auth: the worker renews');
is($open->grpc_calls('LeaseKeepAlive', 'Unauthenticated') + $open->grpc_calls('Txn', 'Unauthenticated'),
	0, 'etcd without auth: no request was refused as unauthenticated (on 3.4: no token sent)');
is_deeply([ $open->keys('etcd_lock/open/') ], [$out], 'etcd without auth: the key is still there');
my $attempts = $open->grpc_calls('Authenticate');
note "authenticate attempts against the etcd without auth: $attempts";
cmp_ok($attempts, '<=', 2,
	'etcd without auth: each process asks once whether auth is on, not before every request');
my $failures = $node->safe_psql('postgres', 'SELECT failures FROM etcd_lock_stats') - $fail0;
cmp_ok($failures, '<=', 2,
	"etcd without auth: etcd_lock_stats.failures counts at most that one answer per process ($failures)");
is($s->query_safe('SELECT etcd_unlock_all()'), '1', 'etcd without auth: unlock');
is_deeply([ $open->leases ], [], 'etcd without auth: no lease left');
set_conf($node, [$s], 'etcd_lock.endpoints' => $etcd->url);

$s->quit;
$etcd->no_leftovers('end');
server_ok($node, 'end');

# ---------------------------------------------------------------------------
# The server log logged every statement, every reload and DEBUG1 messages,
# and never a password
# ---------------------------------------------------------------------------
my $log = slurp_file($node->logfile);
like($log, qr/LOG:  statement: /, 'the server log has the statements (log_statement = all)');
like($log, qr/DEBUG:  /, 'the server log has DEBUG1 messages');
like($log, qr/parameter "etcd_lock\.password_file" changed to "\Q$wrong_file\E"/,
	'the server log has the reloads of etcd_lock.password_file, with the path only');
unlike($log, qr/\Q$pw{$_}\E/, "the server log never shows the $_ password") for sort keys %pw;
note "observed: $_ => $observed{$_}" for sort keys %observed;
$node->stop;
done_testing();
