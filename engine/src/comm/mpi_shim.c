/* MPI handles that mpi.h defines as macros and the `mpi` crate does not bind (their
 * values differ between MPICH and Open MPI, so they are taken from the header the engine
 * is built against). */
#include <mpi.h>

void *strata_mpi_in_place(void) { return MPI_IN_PLACE; }
