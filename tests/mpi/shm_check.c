/* An MPI program as a user builds it on the host (mpicc) and runs it in the MPI
 * image: every rank reports where it runs, rank 0 sends each other rank a message
 * of several MiB (Open MPI's vader BTL moves it with CMA single copy) and gets back
 * whether it arrived intact, and rank 0 writes the verdict to a file in the working
 * directory. */
#define _GNU_SOURCE
#include <mpi.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define MESSAGE (8u << 20)

static unsigned char pattern(size_t i, int to) { return (unsigned char)(i * 131 + to * 7 + 3); }

int main(int argc, char **argv) {
    int rank, size, intact = 1;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    unsigned char *buf = malloc(MESSAGE);
    if (!buf) MPI_Abort(MPI_COMM_WORLD, 2);

    /* One line per rank, in rank order. */
    for (int r = 0; r < size; r++) {
        if (r == rank) {
            printf("rank %d of %d on cpu %d uid %d\n", rank, size, sched_getcpu(), (int)getuid());
            fflush(stdout);
        }
        MPI_Barrier(MPI_COMM_WORLD);
    }
    if (rank == 0) {
        for (int to = 1; to < size; to++) {
            int ok = 0;
            for (size_t i = 0; i < MESSAGE; i++) buf[i] = pattern(i, to);
            MPI_Send(buf, MESSAGE, MPI_BYTE, to, 0, MPI_COMM_WORLD);
            MPI_Recv(&ok, 1, MPI_INT, to, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            intact &= ok;
        }
        FILE *f = fopen("mpi-result.txt", "w");
        if (!f) MPI_Abort(MPI_COMM_WORLD, 3);
        fprintf(f, "%d ranks, %u MiB messages %s\n", size, MESSAGE >> 20, intact ? "intact" : "CORRUPT");
        fclose(f);
    } else {
        MPI_Recv(buf, MESSAGE, MPI_BYTE, 0, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        int ok = 1;
        for (size_t i = 0; i < MESSAGE; i++) ok &= buf[i] == pattern(i, rank);
        MPI_Send(&ok, 1, MPI_INT, 0, 1, MPI_COMM_WORLD);
    }
    free(buf);
    MPI_Finalize();
    return intact ? 0 : 1;
}
