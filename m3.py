import os, sys, time
n=int(sys.argv[1])
envv={"PATH":"/usr/local/bin:/usr/bin:/bin","HOME":"/root","SHELL":"/bin/bash","USER":"root","LOGNAME":"root","PWD":"/root","LANG":"C.UTF-8"}
def run(argv):
    pid=os.posix_spawn("/bin/bash", argv, envv); os.waitpid(pid,0)
V={"exec":["bash","-c","true","bash"],"trap":["bash","-c","trap -- '' EXIT; true","bash"],"hash":["bash","-c","true\n#","bash"],
   "exec_p":["bash","-c","/bin/true","bash"],"trap_p":["bash","-c","trap -- '' EXIT; /bin/true","bash"],"hash_p":["bash","-c","/bin/true\n#","bash"]}
ts={k:[] for k in V}
for i in range(n+20):
    for k,a in V.items():
        t=time.perf_counter(); run(a); d=time.perf_counter()-t
        if i>=20: ts[k].append(d)
print("  ".join(f"{k} {sorted(v)[len(v)//2]*1e6:.0f}" for k,v in ts.items()))
